"""`linalign serve --ray`: the OpenAI-compatible app as a Ray Serve deployment (the `ray` extra).

Each replica is one process with its own `Aligner` and the whole app, continuous batcher included; Ray Serve's
HTTP proxy (on --host/--port) spreads the requests over them. With --max-replicas, Ray Serve's autoscaler adds
replicas while they hold more requests than one batch (--max-batch) each, and removes them when idle.

Stopping keeps the single server's promise. Deleting a Ray Serve application waits for each replica's requests
to end, but tells the app nothing, so a long stream would run until Ray's timeout cut it off. So the driver's
first SIGTERM or SIGINT reaches every replica first, through a small actor each replica waits on: the app admits
nothing more (a new request gets a 503 with Retry-After), running requests get --shutdown-grace seconds, and each
one still running then ends with a final error event or a 503. Then the deployment is deleted (Ray Serve waits for
the ended requests, at most the grace and a margin), Serve and a cluster started here stop, and the command exits
0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from linalign.distributed import RayPlacement, check_capacity, ray_cluster
from linalign.errors import LinalignError
from linalign.jobs import capped_aligner
from linalign.serve.app import check_options, create_app
from linalign.serve.server import CLOSE_MARGIN

NAME = "linalign"  # the Ray Serve application and deployment


class Stopping:
    """A Ray actor the driver sets on its first signal; every replica waits on it."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()

    async def wait(self) -> None:
        await self._stop.wait()

    async def set(self) -> None:
        self._stop.set()


class ServeReplica:
    """One Ray Serve replica: its own `Aligner` and the whole OpenAI-compatible app (with its own continuous
    batcher), built once the model is loaded. Responses carry `x-linalign-replica` (this replica's process id)."""

    def __init__(self, model: dict, app: dict, threads: int, stopping: Any) -> None:
        self.aligner = capped_aligner(threads, **model)
        self.options = app
        self.stopping = stopping
        self.watch: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self):
        app = create_app(self.aligner, **self.options)
        self.watch = asyncio.get_running_loop().create_task(_drain_when_told(self.stopping, app.state.begin_shutdown))
        return _tagged(app, str(os.getpid()).encode())


async def _drain_when_told(stopping: Any, begin_shutdown: Callable[[], None]) -> None:
    from ray.exceptions import RayActorError

    try:
        await stopping.wait.remote()
    except RayActorError:  # the driver is gone (a second signal): Ray Serve ends this replica its own way
        return
    begin_shutdown()


def _tagged(app, replica: bytes):
    """The ASGI `app` with a response header naming the replica that answered."""

    async def tagged(scope, receive, send):
        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-linalign-replica", replica)]}
            await send(message)

        await app(scope, receive, send_tagged if scope["type"] == "http" else send)

    return tagged


def deployment_options(placement: RayPlacement, app: dict, max_replicas: int | None) -> dict:
    """Ray Serve's options for the deployment: the replicas' resources, a fixed count or autoscaling between
    `placement.replicas` and `max_replicas`, and the app's limits and grace where Ray Serve has its own."""
    options = {
        "ray_actor_options": {"num_cpus": placement.cpus_per_replica, "num_gpus": placement.gpus_per_replica},
        # A replica takes one batch of requests; Ray Serve's router holds the rest (up to --max-queue at each
        # proxy, then a 429 with Retry-After, as one server answers) and sends each to a replica with room, on any
        # node: with more room per replica, a proxy would fill the replicas on its own node first.
        "max_ongoing_requests": app["max_batch"],
        "max_queued_requests": app["max_queue"],
        "backpressure_config": {"status_code": 429, "retry_after_s": 1},
        # Past this, Ray kills the replica; the app has ended its requests at the grace already.
        "graceful_shutdown_timeout_s": app["shutdown_grace"] + CLOSE_MARGIN,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if max_replicas is None:
        return options | {"num_replicas": placement.replicas}
    if isinstance(max_replicas, bool) or not isinstance(max_replicas, int) or max_replicas < placement.replicas:
        raise LinalignError(f"--max-replicas must be at least --replicas ({placement.replicas}), got {max_replicas!r}")
    scaling = {"min_replicas": placement.replicas, "max_replicas": max_replicas}
    return options | {"autoscaling_config": scaling | {"target_ongoing_requests": app["max_batch"]}}


class Signals:
    """SIGINT and SIGTERM: the first sets `first`; a second exits at once."""

    def __init__(self) -> None:
        self.first = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, _frame: Any) -> None:
        if self.first.is_set():
            os._exit(128 + sig)
        self.first.set()


def serve_on_ray(
    placement: RayPlacement,
    model: dict,
    app: dict,
    host: str,
    port: int,
    *,
    max_replicas: int | None = None,
    say: Callable[[str], Any] = print,
) -> None:
    """`linalign serve --ray`: replicas of the app behind Ray Serve's HTTP proxy at host:port until a signal;
    then the bounded shutdown of the module's docstring, and a cluster started here stops."""
    if placement.gpus_per_replica > 0 and model.get("device", "cpu") == "cpu":
        raise LinalignError("--gpus-per-replica needs a GPU device: add --device cuda")
    check_options(**app)  # here, not in each replica as it loads
    options = deployment_options(placement, app, max_replicas)
    with ray_cluster(placement.address) as ray:
        from ray import serve

        check_capacity(ray, placement)
        signals = Signals()  # after ray.init, which sets its own; a signal while replicas load stops them once up
        stopping = ray.remote(num_cpus=0)(Stopping).remote()
        deployment = serve.deployment(serve.ingress()(ServeReplica), name=NAME, **options)
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(deployment.bind(model, app, placement.threads, stopping), name=NAME, route_prefix="/")
            count = f"{placement.replicas}" + (f" to {max_replicas}" if max_replicas is not None else "")
            guard = " (API key required)" if app.get("api_key") else ""
            say(f"serving {model['model']} at http://{host}:{port}/v1 on {count} Ray replicas{guard}")
            signals.first.wait()
            grace = app["shutdown_grace"]
            say(f"stopping: no new requests; running ones get {grace:g} s to finish (a second signal exits now)")
            ray.get(stopping.set.remote())
            serve.delete(NAME)
        finally:
            serve.shutdown()
