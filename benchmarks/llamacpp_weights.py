"""Linear Alignment on llama.cpp where reading the weights dominates a step: a random-weight ~1.2B Llama.

Writes (once) a Llama-3.2-1B-shaped GGUF with random weights over the built-in model's vocabulary, then decodes
the benchmark's prompts to a forced length with llama.cpp's own plain greedy decoding, linalign's plain decoding
and linalign's Linear Alignment (both on the llama.cpp backend), best of `--repeats`, and prints tokens/s and
the ratios. Random weights make the figures speed-only.

    python benchmarks/llamacpp_weights.py --dtype f16 --new-tokens 128 --batch 1

On a CPU with few cores only F16 weights make reads dominate: Q8_0 is bound by arithmetic there too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from linalign import Aligner
from linalign.backends.gguf_random import random_llama_gguf
from linalign.bench import PROMPTS, _llama_runs, _timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="q8_0", choices=("q8_0", "f16"))
    parser.add_argument("--path", type=Path, help="default: runs/random-llama-2048x16-<dtype>.gguf")
    args = parser.parse_args()
    # the file name carries the type: an existing file is reused, so one type must never stand in for another
    path = random_llama_gguf(args.path or Path(f"runs/random-llama-2048x16-{args.dtype}.gguf"), dtype=args.dtype)
    aligner = Aligner(str(path), backend="llamacpp")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    runs = _llama_runs(aligner, prompts, args.new_tokens, ratio=2.0)
    runs["linalign-llamacpp"]()  # warm-up
    cpu = torch.device("cpu")
    speed = {
        name: args.batch * args.new_tokens / min(_timed(run, cpu) for _ in range(args.repeats))
        for name, run in runs.items()
    }
    report = {
        "model": path.name,
        "weights": "random",
        "threads": aligner.main.runner.threads,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "tokens_per_s": {k: round(v, 2) for k, v in speed.items()},
        "la_vs_llama_cpp": round(speed["linalign-llamacpp"] / speed["llama.cpp"], 2),
        "la_vs_linalign_plain": round(speed["linalign-llamacpp"] / speed["linalign-plain-llamacpp"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
