"""Finished rows in the compiled static batch: kept and masked out, or compacted away every k steps?

The built-in model decodes the benchmark's 8 prompts with Linear Alignment at their natural lengths (they finish
at different steps), eagerly and compiled, with finished rows kept (the default) and compacted every k steps.
Compilation happens in a warm-up first; with symbolic sizes, smaller batches after a compaction reuse it.

    python benchmarks/compaction.py --new-tokens 64 --every 8,32
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.backends import compiled
from linalign.bench import PRINCIPLE, PROMPTS
from linalign.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--every", default="8,32", help="Compaction intervals to try, comma-separated.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    compiled.DYNAMIC = True
    loaded = load_model(dtype=args.dtype, device=args.device)
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=2.0)
    config = DecodeConfig(max_new_tokens=args.new_tokens)
    variants = {"eager": (Aligner(loaded), None), "compiled, finished rows kept": (Aligner(loaded, compile=True), None)}
    for k in (int(x) for x in args.every.split(",")):
        variants[f"compiled, compacted every {k} steps"] = (variants["compiled, finished rows kept"][0], k)
    t0 = time.perf_counter()
    variants["eager"][0].generate(PROMPTS, align, config)
    warm = variants["compiled, finished rows kept"][0]
    for k in (None, *(k for _, k in variants.values() if k)):
        compiled.COMPACT_EVERY = k
        warm.generate(PROMPTS, align, config)  # compilation, and any shapes compaction needs
    print(f"warm-up (compilation included): {time.perf_counter() - t0:.0f} s", flush=True)
    results, expected = {}, None
    for name, (aligner, k) in variants.items():
        compiled.COMPACT_EVERY = k
        t0 = time.perf_counter()
        out = aligner.generate(PROMPTS, align, config)
        seconds = time.perf_counter() - t0
        ids = [g.token_ids for g in out]
        expected = expected or ids
        results[name] = {
            "seconds": round(seconds, 2),
            "tokens": sum(len(t) for t in ids),
            "same_tokens_as_eager": ids == expected,
        }
        print(name, results[name], flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "results": results}))


if __name__ == "__main__":
    main()
