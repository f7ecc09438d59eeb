"""Stopping `linalign serve`: a real server process, real signals, streams running.

On SIGTERM the server admits nothing more, gives running requests `--shutdown-grace` seconds, ends each one still
running with a final error event (a stream) or a 503 (a plain request), and exits; a second signal exits at once.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = 450  # most of the tiny model's context: many seconds of decoding on any CPU
CUT = "(the connection was cut)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(model: str, grace: float) -> Iterator[tuple[subprocess.Popen, str]]:
    port = _free_port()
    command = [sys.executable, "-c", "from linalign.cli import app; app()", "serve", "--model", model]
    command += ["--port", str(port), "--shutdown-grace", str(grace), "--backend", "transformers"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{root}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        yield process, f"{root}/v1"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _streams(url: str, count: int) -> tuple[list[threading.Thread], dict, threading.Barrier]:
    """`count` long streams on threads; the barrier is passed once every one has its first token."""
    events: dict[int, list[str]] = {}
    started = threading.Barrier(count + 1, timeout=120)

    def stream(i: int) -> None:
        body = {"messages": QUESTION, "max_tokens": LONG, "stream": True}
        events[i] = []
        try:
            with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if not line:
                        continue
                    events[i].append(line)
                    if len(events[i]) == 2:  # the role, then the first token
                        started.wait()
        except httpx.TransportError:
            events[i].append(CUT)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    return threads, events, started


def test_sigterm_ends_running_requests_after_the_grace_and_exits(tiny):
    grace = 1.0
    with _server(tiny.name, grace) as (process, url):
        threads, events, started = _streams(url, 3)
        started.wait()
        plain: dict[str, httpx.Response] = {}
        body = {"messages": QUESTION, "max_tokens": LONG}
        waiting = threading.Thread(
            target=lambda: plain.update(reply=httpx.post(f"{url}/chat/completions", json=body, timeout=120))
        )
        waiting.start()
        root = url.removesuffix("/v1")
        deadline = time.monotonic() + 60
        while httpx.get(f"{root}/health").json()["running"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)  # the plain request is decoding too
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        took = time.monotonic() - start
        for t in [*threads, waiting]:
            t.join(10)
        with pytest.raises(httpx.TransportError):  # nothing listens any more
            httpx.post(f"{url}/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
    assert grace <= took < grace + 10, took
    for lines in events.values():
        *_, error, done = lines
        assert done == "data: [DONE]"
        assert json.loads(error.removeprefix("data: "))["error"]["code"] == "server_shutting_down"
    reply = plain["reply"]
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "server_shutting_down"
    output = process.stdout.read()
    assert "get 1.0 s to finish" in output


def test_a_second_signal_exits_at_once(tiny):
    with _server(tiny.name, grace=120) as (process, url):
        threads, events, started = _streams(url, 2)
        started.wait()
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert process.poll() is None  # still giving the streams their grace
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rc = process.wait(30)
        took = time.monotonic() - start
        for t in threads:
            t.join(10)
    assert took < 5 and rc == 128 + signal.SIGTERM
    assert all(lines[-1] == CUT for lines in events.values())
