"""Running the app under uvicorn: in the foreground for `linalign serve`, or on a thread for benchmarks and tests.

uvicorn alone waits for every open response before it lets the app shut down, so a long stream would hold a
stopping server for as long as it runs. `Server` starts the app's own bounded shutdown first: on the first
SIGTERM or SIGINT the app admits nothing more and gives running requests its grace period, after which each
remaining one ends with a final error event or a 503, its connection closes and the process exits. A second
signal exits at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("uvicorn.error")  # uvicorn's own log, which `linalign serve` shows

# After the grace period, how long uvicorn waits for connections to close before cancelling their tasks (a client
# that stopped reading can hold a response open).
CLOSE_MARGIN = 5.0


class Server(uvicorn.Server):
    """uvicorn's server with the app's bounded shutdown (`app.state.begin_shutdown`) and a second signal that
    exits at once."""

    def __init__(self, app: FastAPI, **config) -> None:
        grace = getattr(app.state, "shutdown_grace", None)
        if grace is not None:
            config.setdefault("timeout_graceful_shutdown", grace + CLOSE_MARGIN)
        super().__init__(uvicorn.Config(app, **config))
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            logger.warning("a second signal: exiting now, without waiting for running requests")
            os._exit(128 + sig)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        begin = getattr(self.app.state, "begin_shutdown", None)
        if begin is not None:
            batcher = getattr(self.app.state, "batcher", None)
            running = batcher.running if batcher is not None else 0
            logger.info(
                "stopping: no new requests; %d running sequences get %.1f s to finish (a second signal exits now)",
                running,
                self.app.state.shutdown_grace,
            )
            begin()  # before uvicorn starts waiting for open responses, so that the wait is bounded
        await super().shutdown(sockets)


@contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on a background thread and yield its base URL (`.../v1`); port 0 picks a free one."""
    server = Server(app, host=host, port=port, log_level="warning")
    thread = threading.Thread(target=server.run, name="linalign-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
