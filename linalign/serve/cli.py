"""`linalign serve`: load a model and serve the OpenAI-compatible endpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from linalign.errors import LinalignError
from linalign.options import BackendOpt, CompileOpt, DeviceOpt, DtypeOpt, ModelOpt, RatioOpt, RefModelOpt, exits_cleanly

HostOpt = Annotated[str, typer.Option(help="Interface to bind; the default keeps the server on this machine.")]
PortOpt = Annotated[int, typer.Option(help="TCP port.")]
MaxBatchOpt = Annotated[int, typer.Option(help="Sequences decoded together at most.")]
ApiKeyOpt = Annotated[
    str | None, typer.Option(envvar="LINALIGN_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1.")
]


@exits_cleanly
def serve(
    model: ModelOpt = "smollm2",
    ref_model: RefModelOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    compile: CompileOpt = False,
    backend: BackendOpt = "auto",
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    api_key: ApiKeyOpt = None,
    system_as_principle: Annotated[
        bool,
        typer.Option(
            "--system-as-principle",
            help="Without a 'linalign' object, align with the request's system message as the principle (la).",
        ),
    ] = False,
    ratio: RatioOpt = 2.0,
    max_batch: MaxBatchOpt = 16,
    batch_window_ms: Annotated[
        float, typer.Option(help="How long the decode loop waits to prefill requests sent together at once.")
    ] = 20.0,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies are refused with a 400.")] = 1 << 20,
    model_name: Annotated[str | None, typer.Option(help="Model id reported to clients (default: --model).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; more get 429 + Retry-After.")] = 256,
    prefill_chunk: Annotated[
        int,
        typer.Option(help="Prompt tokens prefilled per decode step: what a running request's next token waits for."),
    ] = 256,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds a request may take in all (queue + decoding); none by default.")
    ] = None,
    shutdown_grace: Annotated[
        float,
        typer.Option(
            help="On SIGTERM/SIGINT, seconds running requests get to finish before they end with an error (a "
            "second signal exits at once)."
        ),
    ] = 10.0,
    ray: Annotated[
        bool,
        typer.Option("--ray", help="Serve from replicas on a local Ray cluster (no value: see --ray-address)."),
    ] = False,
    ray_address: Annotated[str | None, typer.Option(help="Replicas on the running Ray cluster at HOST:PORT.")] = None,
    replicas: Annotated[
        int, typer.Option(help="Ray Serve replicas, each its own model and batcher (the least, with --max-replicas).")
    ] = 1,
    max_replicas: Annotated[
        int | None, typer.Option(help="Let Ray Serve add replicas under load, up to this many.")
    ] = None,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs a Ray replica reserves (its threads).")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs a Ray replica reserves.")] = 0.0,
) -> None:
    """Serve OpenAI's chat completions API; a 'linalign' object in the body chooses method and principle."""
    from linalign.engine import Aligner
    from linalign.serve.app import create_app
    from linalign.serve.server import Server

    console = Console(stderr=True)
    if ray or ray_address is not None:
        from linalign.distributed import RayPlacement
        from linalign.serve.replicas import serve_on_ray

        serve_on_ray(
            RayPlacement(ray_address, replicas, cpus_per_replica, gpus_per_replica),
            {"model": model, "reference": ref_model, "dtype": dtype, "device": device, "backend": backend}
            | {"compile": compile},
            {"api_key": api_key, "system_as_principle": system_as_principle, "ratio": ratio, "max_batch": max_batch}
            | {"batch_window": batch_window_ms / 1000, "max_body_bytes": max_body_bytes, "model_name": model_name}
            | {"max_queue": max_queue, "request_timeout": request_timeout, "shutdown_grace": shutdown_grace}
            | {"prefill_chunk": prefill_chunk},
            host,
            port,
            max_replicas=max_replicas,
            say=console.print,
        )
        return
    if (replicas, max_replicas, cpus_per_replica, gpus_per_replica) != (1, None, 1.0, 0.0):
        raise LinalignError("--replicas, --max-replicas and --cpus/--gpus-per-replica place Ray replicas: add --ray")
    with console.status(f"loading {model}", spinner="dots"):
        aligner = Aligner(model, reference=ref_model, dtype=dtype, device=device, backend=backend, compile=compile)
    app = create_app(
        aligner,
        api_key=api_key,
        system_as_principle=system_as_principle,
        ratio=ratio,
        max_batch=max_batch,
        batch_window=batch_window_ms / 1000,
        max_body_bytes=max_body_bytes,
        model_name=model_name,
        max_queue=max_queue,
        request_timeout=request_timeout,
        shutdown_grace=shutdown_grace,
        prefill_chunk=prefill_chunk,
    )
    guard = " (API key required)" if api_key else ""
    console.print(f"serving {aligner.main.name} at http://{host}:{port}/v1{guard}")
    Server(app, host=host, port=port).run()
