"""The batch job (`linalign generate --input`) in one process and on Ray replicas: wall time, time to the first
record, records/s.

    python benchmarks/jobs.py --records 200 --max-new-tokens 8

Runs, one after the other, on the built-in model (llama.cpp backend where installed), Linear Alignment with each
record's own (short) principle: Ray with 2 and 1 replicas of one CPU and one thread each (a local cluster on
loopback, started and stopped by each run), then one process with one thread and one with every core's thread.
Every run writes its own output; the script checks that they hold the same records and prints one JSON line per
run, with the 1-minute load average before and after it. Ray's cost per record: `--model TINY_MODEL_DIR
--max-new-tokens 1 --runs local-1,ray-1`, where decoding costs next to nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from linalign.distributed import RayPlacement, ray_executor
from linalign.evaluation.datasets import load_questions
from linalign.jobs import Batch, JobSettings, local_executor, run_job


def write_input(path: Path, n: int) -> None:
    """`n` records over the shipped questions, each with its own short principle."""
    questions = load_questions()
    principles = ["Answer in lowercase.", "Answer in one sentence.", "Answer like a pirate.", "Be very polite."]
    with path.open("w") as f:
        for i in range(n):
            row = {"id": i, "prompt": questions[i % len(questions)], "principle": principles[i % len(principles)]}
            f.write(json.dumps(row) + "\n")


def timed(execute, marks: dict):
    """`execute` with the time its first batch came back recorded in `marks`."""

    def run(batches: list[Batch]) -> Iterator[dict]:
        for result in execute(batches):
            marks.setdefault("first", time.perf_counter())
            yield result

    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", default="ray-2,ray-1,local-1,local")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="linalign-jobs-"))
    source = work / "prompts.jsonl"
    write_input(source, args.records)
    decode = {"max_new_tokens": args.max_new_tokens}
    settings = JobSettings(input=str(source), model=args.model, methods=["la"], decode=decode)
    outputs = {}
    for name in args.runs.split(","):
        if name.startswith("ray-"):
            execute = ray_executor(settings, RayPlacement(replicas=int(name[4:])))
        else:
            execute = local_executor(settings, threads=1 if name == "local-1" else None)
        marks: dict = {}
        out = work / f"{name}.jsonl"
        load_before = os.getloadavg()[0]  # the machine may be shared: each run states the load it met
        start = time.perf_counter()
        summary = run_job(settings, out, timed(execute, marks), batch_size=args.batch_size, show_progress=False)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in out.read_text().splitlines()]
        outputs[name] = sorted(out.read_text().splitlines())
        tokens = sum(r["new_tokens"] for r in records)
        first = marks["first"] - start
        print(
            json.dumps(
                {
                    "run": name,
                    "records": summary.written,
                    "wall_s": round(wall, 1),
                    "first_batch_s": round(first, 1),
                    "records_per_s": round(summary.written / wall, 2),
                    "after_first_records_per_s": round((summary.written - args.batch_size) / (wall - first), 2),
                    "tokens": tokens,
                    "load_1min_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                }
            ),
            flush=True,
        )
    names = list(outputs)
    same = {n: outputs[n] == outputs[names[0]] for n in names[1:]}
    print(json.dumps({"same_records_as": names[0], **same}))


if __name__ == "__main__":
    main()
