"""The playground: a page at `/` that shows every method side by side, streamed through the server's own API.

The page is static HTML, CSS and JavaScript shipped in the package (`static/`), with nothing fetched from the
network. Under `--api-key` the page itself stays public; its requests to `/v1` carry the key the user types.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path
from typing import Annotated

import typer
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from rich.console import Console

from linalign.options import DeviceOpt, DtypeOpt, ModelOpt, RatioOpt, RefModelOpt, exits_cleanly
from linalign.serve.cli import ApiKeyOpt, MaxBatchOpt, serve

STATIC = Path(__file__).parent / "static"
MOUNT = "playground"  # the page's files are served under /playground/

OpenOpt = Annotated[bool, typer.Option("--open/--no-open", help="Open the page in a browser once it is ready.")]


def mount_playground(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/playground/`; a second call changes nothing."""
    if any(getattr(route, "name", None) == MOUNT for route in app.routes):
        return
    app.mount(f"/{MOUNT}", StaticFiles(directory=STATIC), name=MOUNT)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "health", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def open_when_ready(url: str, timeout: float = 600.0) -> threading.Thread:
    """Open `url` in a browser once its server answers `/health` (loading a model takes a while)."""

    def wait_and_open() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _ready(url):
                webbrowser.open(url)
                return
            time.sleep(0.25)

    thread = threading.Thread(target=wait_and_open, name="linalign-open-browser", daemon=True)
    thread.start()
    return thread


@exits_cleanly
def playground(
    model: ModelOpt = "smollm2",
    ref_model: RefModelOpt = None,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = "cpu",
    api_key: ApiKeyOpt = None,
    ratio: RatioOpt = 2.0,
    max_batch: MaxBatchOpt = 16,
    open_browser: OpenOpt = True,
) -> None:
    """Serve the playground on a free local port, print its address and open it in a browser."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    Console(stderr=True).print(f"playground: {url}")
    if open_browser:
        open_when_ready(url)
    serve(
        model=model,
        ref_model=ref_model,
        dtype=dtype,
        device=device,
        host="127.0.0.1",
        port=port,
        api_key=api_key,
        ratio=ratio,
        max_batch=max_batch,
    )
