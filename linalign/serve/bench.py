"""`linalign serve-bench`: throughput and latency of the server under 1, 4 and 8 concurrent clients (or the
mixed load, the soak, the heavy mixes and the shutdown of `linalign.serve.load`).

The server runs in-process on a free port; every client is a thread with the official `openai` client
sending a fixed number of greedy Linear Alignment requests with a fixed max_tokens, one after the other.
Concurrent requests share decode steps through dynamic batching, which is what the speed-up measures.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from linalign.bench import PRINCIPLE, PROMPTS
from linalign.errors import LinalignError
from linalign.options import BackendOpt, DeviceOpt, DtypeOpt, ModelOpt, RatioOpt, exits_cleanly
from linalign.serve.batcher import Batcher


def _client_run(base_url: str, requests: int, max_tokens: int, ratio: float) -> list[tuple[float, int]]:
    """(latency seconds, completion tokens) of each request of one client.

    Every client asks the same questions in the same order, so every level does the same work per request
    (greedy answers are identical) and the levels differ only in how many requests share the model.
    """
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    results = []
    for r in range(requests):
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model="linalign",
            messages=[{"role": "user", "content": PROMPTS[r % len(PROMPTS)]}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"linalign": {"method": "la", "principle": PRINCIPLE, "ratio": ratio}},
        )
        results.append((time.perf_counter() - start, reply.usage.completion_tokens))
    return results


def _level(base_url: str, batcher: Batcher, clients: int, requests: int, max_tokens: int, ratio: float) -> dict:
    batches_before = len(batcher.batch_sizes)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda _: _client_run(base_url, requests, max_tokens, ratio), range(clients)))
    seconds = time.perf_counter() - start
    latencies = sorted(lat for run in runs for lat, _ in run)
    tokens = sum(n for run in runs for _, n in run)
    return {
        "clients": clients,
        "requests": len(latencies),
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "latency_mean_s": round(statistics.fmean(latencies), 3),
        "latency_p95_s": round(latencies[math.ceil(0.95 * len(latencies)) - 1], 3),  # nearest rank
        "mean_batch": round(statistics.fmean(batcher.batch_sizes[batches_before:]), 2),
    }


def run_serve_bench(
    model: str = "smollm2",
    clients: tuple[int, ...] = (1, 4, 8),
    requests: int = 4,
    max_tokens: int = 64,
    ratio: float = 2.0,
    dtype: str = "float32",
    device: str = "cpu",
    backend: str = "auto",
) -> dict:
    """Measure every concurrency level against one in-process server; returns the JSON report."""
    from linalign.engine import Aligner
    from linalign.serve.app import create_app
    from linalign.serve.server import serving

    if requests < 1 or max_tokens < 1 or not clients or min(clients) < 1:
        raise LinalignError("clients, requests and max_tokens must all be >= 1")
    clients = tuple(sorted(set(clients)))  # the speed-up is measured against the fewest clients
    aligner = Aligner(model, dtype=dtype, device=device, backend=backend)
    app = create_app(aligner, max_batch=max(clients), ratio=ratio)
    with serving(app) as base_url:
        _client_run(base_url, 1, max_tokens, ratio)  # warm-up: first-call allocations and lazy imports
        levels = [_level(base_url, app.state.batcher, c, requests, max_tokens, ratio) for c in clients]
    for level in levels:
        level["speedup"] = round(level["tokens_per_s"] / levels[0]["tokens_per_s"], 2)
    return {
        "model": aligner.main.name,
        "backend": aligner.main.backend,
        "device": str(aligner.main.device),
        "threads": torch.get_num_threads(),
        "max_tokens": max_tokens,
        "requests_per_client": requests,
        "method": "la",
        "ratio": ratio,
        "levels": levels,
    }


def run_mixed(
    model: str,
    dtype: str,
    device: str,
    ratio: float,
    soak_seconds: float | None,
    backend: str = "auto",
    heavy: bool = False,
) -> dict:
    """The mixed load and head-of-line case (or the soak, or the heavy mixes) against one in-process server."""
    from linalign.engine import Aligner
    from linalign.serve.app import create_app
    from linalign.serve.load import head_of_line, heavy_mixes, mixed_load, soak
    from linalign.serve.server import serving

    aligner = Aligner(model, dtype=dtype, device=device, backend=backend)
    app = create_app(aligner, max_batch=16, ratio=ratio)
    report = {
        "model": aligner.main.name,
        "backend": aligner.main.backend,
        "device": str(aligner.main.device),
        "threads": torch.get_num_threads(),
    }
    with serving(app) as base_url:
        if soak_seconds:
            report["soak"] = soak(base_url, soak_seconds)
        elif heavy:
            report["heavy"] = heavy_mixes(base_url, aligner.main.context_length or 2048)
        else:
            report["mixed"] = mixed_load(base_url)
            report["head_of_line"] = head_of_line(base_url)
    return report


@exits_cleanly
def serve_bench(
    model: ModelOpt = "smollm2",
    clients: Annotated[list[int] | None, typer.Option(help="Concurrent clients per level; repeatable.")] = None,
    requests: Annotated[int, typer.Option(help="Requests each client sends, one after the other.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="max_tokens of every request (greedy).")] = 64,
    ratio: RatioOpt = 2.0,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    backend: BackendOpt = "auto",
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/serve-bench.json"),
    mixed: Annotated[
        bool, typer.Option("--mixed", help="16 clients of mixed lengths and settings, and the head-of-line case.")
    ] = False,
    soak: Annotated[
        float | None, typer.Option(help="Seconds of mixed load with malformed and cost-attack requests.")
    ] = None,
    heavy: Annotated[
        bool,
        typer.Option(
            "--heavy",
            help="A 16-token request's time to first token beside heavy requests (n, logprobs, long prompts).",
        ),
    ] = False,
    shutdown: Annotated[
        bool, typer.Option("--shutdown", help="Seconds a `linalign serve` process takes to exit after SIGTERM.")
    ] = False,
) -> None:
    """Requests/s, tokens/s and latency of `linalign serve` with 1, 4 and 8 concurrent clients (or a mixed load,
    a soak, heavy mixes or the shutdown time)."""
    console = Console()
    if shutdown:
        import socket
        import sys

        from linalign.serve.load import shutdown_time

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-c", "from linalign.cli import app; app()", "serve", "--model", model]
        command += ["--backend", backend, "--dtype", dtype, "--device", device, "--port", str(port)]
        with console.status("timing a shutdown with 4 long streams running", spinner="dots"):
            report = {"model": model, "backend": backend, "shutdown": shutdown_time(command, port)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print_json(data=report)
        return
    if mixed or soak or heavy:
        with console.status("benchmarking the server under a mixed load", spinner="dots"):
            report = run_mixed(model, dtype, device, ratio, soak, backend, heavy)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print_json(data=report)
        console.print(f"report written to {out}")
        return
    with console.status("benchmarking the server", spinner="dots"):
        report = run_serve_bench(
            model, tuple(clients or (1, 4, 8)), requests, max_tokens, ratio, dtype, device, backend
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(
        title=f"linalign serve: {report['model']} on {report['device']} ({report['threads']} threads), la ratio "
        f"{ratio}, greedy, {max_tokens} tokens, {requests} requests per client"
    )
    baseline = report["levels"][0]["clients"]
    columns = ("clients", "requests/s", "tokens/s", "mean latency s", "p95 latency s", "mean batch")
    for column in (*columns, f"speed-up vs {baseline}"):
        table.add_column(column, justify="right")
    for r in report["levels"]:
        table.add_row(
            str(r["clients"]),
            f"{r['requests_per_s']:.2f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['latency_mean_s']:.2f}",
            f"{r['latency_p95_s']:.2f}",
            f"{r['mean_batch']:.1f}",
            f"{r['speedup']:.2f}",
        )
    console.print(table)
    console.print(f"report written to {out}")
