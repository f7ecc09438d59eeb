"""The server under a realistic mix, for `linalign serve-bench --mixed` and `--soak`.

- Mixed load: clients send requests with `max_tokens` drawn from 8–128, half greedy and half sampled with
  seeds, over four principles, streamed so time-to-first-token is measured; one client alone is the baseline.
- Head of line: an 8-token request sent 1.5 s after a 400-token one, against the same request alone.
- Soak: the mixed load with malformed and cost-attack requests interleaved, for a given time; counts every
  status, and the process's memory before and after.
- Heavy mixes: a 16-token request's time to first token beside requests that are heavy yet within the limits
  (many copies with many log-probabilities; eight long prompts at once), against the same request alone.
- Shutdown: how long a server process takes to exit after SIGTERM with long streams running.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PRINCIPLES = [
    "Answer in lowercase letters only. Never use capital letters.",
    "Keep every answer very short: no more than 30 words in total.",
    "Talk like a pirate.",
    "Answer in a formal, polite register.",
]
QUESTIONS = ["Why is the sky blue?", "How do I boil an egg?", "Name three famous scientists.", "What is rain?"]
# Small bodies that once bought a large bill; each must be a quick 400.
ATTACKS = [
    {"stop": [f"s{i}" for i in range(300)]},
    {"linalign": {"method": "amulet", "principle": "p", "amulet_iterations": 10**9}},
    {"linalign": {"principles": [f"principle {i}" for i in range(1000)]}},
    {"seed": 2**64, "temperature": 1},
    {"linalign": {"principle": "p", "ratio": 1e300}},
    {"linalign": {"principle": "p", "weights": [1e300]}},
]


def _body(rng: random.Random, max_tokens: int | None = None) -> dict:
    body = {
        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
        "max_tokens": max_tokens or rng.randint(8, 128),
        "stream": True,
        "linalign": {"method": "la", "principle": rng.choice(PRINCIPLES)},
    }
    if rng.random() < 0.5:
        body |= {"temperature": 0.8, "seed": rng.randrange(2**31)}
    return body


def _stream(http: httpx.Client, url: str, body: dict) -> tuple[float, float, int]:
    """(latency, time to first token, tokens) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, 0
    with http.stream("POST", f"{url}/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":' in line and '"content": ""' not in line:
                first = first or time.perf_counter()
                tokens += 1
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens


def _client(url: str, seed: int, requests: int) -> list[tuple[float, float, int]]:
    rng = random.Random(seed)
    with httpx.Client(timeout=600) as http:
        return [_stream(http, url, _body(rng)) for _ in range(requests)]


def _summary(runs: list[list[tuple[float, float, int]]], seconds: float) -> dict:
    results = [r for run in runs for r in run]
    return {
        "requests": len(results),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(n for *_, n in results) / seconds, 2),
        "latency_p50_s": round(statistics.median(r[0] for r in results), 3),
        "ttft_p50_s": round(statistics.median(r[1] for r in results), 3),
    }


def mixed_load(url: str, clients: int = 16, requests: int = 2) -> dict:
    """One client alone, then `clients` at once, each sending `requests` mixed requests."""
    levels = {}
    for n in (1, clients):
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            runs = list(pool.map(lambda c: _client(url, c, requests), range(n)))
        levels[n] = _summary(runs, time.perf_counter() - start)
    one, many = levels[1], levels[clients]
    return {
        "clients": clients,
        "alone": one,
        "together": many,
        "throughput_vs_one": round(many["tokens_per_s"] / one["tokens_per_s"], 2),
        "ttft_p50_vs_one": round(many["ttft_p50_s"] / one["ttft_p50_s"], 2),
    }


def head_of_line(url: str) -> dict:
    """Latency of an 8-token request alone and 1.5 s after a 400-token request with other settings."""
    rng = random.Random(0)
    short = _body(rng, max_tokens=8) | {"linalign": {"method": "prompt", "principle": PRINCIPLES[1]}}
    short.pop("temperature", None)
    short.pop("seed", None)
    long = _body(rng, max_tokens=400) | {"temperature": 0.9, "seed": 1}
    with httpx.Client(timeout=900) as http:
        alone = _stream(http, url, short)[0]
        thread = threading.Thread(target=_stream, args=(http, url, long))
        thread.start()
        time.sleep(1.5)
        behind = _stream(http, url, short)[0]
        thread.join()
    return {"alone_s": round(alone, 3), "after_long_s": round(behind, 3), "ratio": round(behind / alone, 2)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def soak(url: str, seconds: float, clients: int = 8) -> dict:
    """Mixed load plus malformed and cost-attack requests for `seconds`; statuses counted, memory compared."""
    statuses: dict[str, int] = {}
    lock, stop_at = threading.Lock(), time.monotonic() + seconds

    def count(key: str) -> None:
        with lock:
            statuses[key] = statuses.get(key, 0) + 1

    def worker(c: int) -> None:
        rng = random.Random(1000 + c)
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < stop_at:
                if rng.random() < 0.3:
                    bad = rng.choice([*ATTACKS, None])
                    body = None if bad is None else {"messages": [{"role": "user", "content": "hi"}]} | bad
                    content = b'{"messages": [' if body is None else None
                    response = http.post(f"{url}/chat/completions", json=body, content=content)
                    count(str(response.status_code))
                    continue
                try:
                    _stream(http, url, _body(rng, max_tokens=rng.randint(8, 48)))
                    count("200")
                except httpx.HTTPStatusError as err:
                    count(str(err.response.status_code))

    _client(url, 0, 1)  # warm-up, so that first-use allocations do not count as growth
    before = _rss_mb()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    after = _rss_mb()
    return {
        "seconds": seconds,
        "statuses": dict(sorted(statuses.items())),
        "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
        "rss_mb_before": round(before, 1),
        "rss_mb_after": round(after, 1),
        "rss_growth": round(after / before - 1, 4),
    }


# -- heavy mixes: a short request beside requests that are heavy yet within every limit ------------------------

PROBE_TOKENS = 16


def _probe(http: httpx.Client, url: str, cap: float = 120) -> dict:
    """Time to first token and latency of one short request: 16 greedy tokens of Linear Alignment. A request
    that has no token after `cap` seconds is dropped and counted as `cap` (`capped`)."""
    body = {
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": PROBE_TOKENS,
        "stream": True,
        "linalign": {"method": "la", "principle": PRINCIPLES[1]},
    }
    start, first = time.perf_counter(), None
    try:
        with http.stream("POST", f"{url}/chat/completions", json=body, timeout=httpx.Timeout(10, read=cap)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if first is None and '"content":' in line and '"content": ""' not in line:
                    first = time.perf_counter()
                if first is None and time.perf_counter() - start > cap:
                    break
    except httpx.ReadTimeout:
        pass
    end = time.perf_counter()
    if first is None:
        return {"ttft_s": cap, "latency_s": round(end - start, 3), "capped": True}
    return {"ttft_s": round(first - start, 3), "latency_s": round(end - start, 3)}


class _Background:
    """`bodies` sent streamed at once, each read until it ends or `stop` drops it (the server then cancels it);
    the status and bytes of each go into `outcome`."""

    def __init__(self, url: str, bodies: list[dict]) -> None:
        self.outcome: dict[int, dict] = {}
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [
            threading.Thread(target=self._run, args=(url, i, b), daemon=True) for i, b in enumerate(bodies)
        ]
        for t in self._threads:
            t.start()

    def _run(self, url: str, i: int, body: dict) -> None:
        received, status, error = 0, None, None
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(10, read=None)) as http,
                http.stream("POST", f"{url}/chat/completions", json=body | {"stream": True}) as response,
            ):
                status = response.status_code
                stream = response.extensions.get("network_stream")
                if stream is not None:
                    self._sockets.append(stream.get_extra_info("socket"))
                if status != 200:
                    response.read()
                    error = response.json().get("error", {}).get("message")
                else:
                    for chunk in response.iter_bytes():
                        received += len(chunk)
                        if self._stopped.is_set():
                            break
        except httpx.HTTPError as err:
            if not self._stopped.is_set():
                error = f"{type(err).__name__}: {err}"
        self.outcome[i] = {"status": status, "bytes": received} | ({"error": error} if error else {})

    def stop(self) -> None:
        """Hang up on every request still running (a request waiting in the queue sends nothing to wake a reader,
        so its socket is shut from here)."""
        self._stopped.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(60)


def _wait_idle(root: str, timeout: float = 300) -> None:
    """Until the server has nothing queued or running (dropped requests are cancelled at the next step)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=10) as http:
        while time.monotonic() < deadline:
            health = http.get(f"{root}/health").json()
            if not health["queued"] and not health["running"]:
                return
            time.sleep(0.1)


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1]


def _ttft(probes: list[dict]) -> dict:
    ttfts = [p["ttft_s"] for p in probes]
    return {"capped": sum(bool(p.get("capped")) for p in probes)} | {
        "probes": len(ttfts),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": _nearest_rank(ttfts, 0.95),
    }


HEAVY_MIXES = ("n16_top20", "n12_top5", "long_prompts")


def heavy_mixes(
    url: str,
    context: int,
    probes: int = 5,
    rounds: int = 3,
    report: dict | None = None,
    mixes: tuple[str, ...] = HEAVY_MIXES,
) -> dict:
    """Time to first token of a 16-token request beside each heavy mix, and alone.

    - `n16_top20`: one request with `n=16`, `top_logprobs=20` and `max_tokens` up to the context (what once held
      every place of the batch for minutes); `probes` short requests one after the other beside it.
    - `n12_top5`: the heaviest of that kind within the server's limits (`n=12`, `top_logprobs=5`,
      `max_tokens=1024`), with `probes` short requests beside it.
    - `long_prompts`: eight requests with ~1,000-token prompts sent at once and a short request 0.3 s later,
      `rounds` times.

    Results go into `report` (a new dict by default) as each mix of `mixes` ends, which is returned.
    """
    report = {} if report is None else report
    root = url.removesuffix("/v1")
    question = [{"role": "user", "content": QUESTIONS[1]}]
    with httpx.Client(timeout=600) as http:
        _probe(http, url)  # warm-up
        report["alone"] = _ttft([_probe(http, url) for _ in range(probes)])
        sampled = {"messages": question, "temperature": 1.0, "seed": 1, "logprobs": True}
        heavy = {
            "n16_top20": sampled | {"n": 16, "top_logprobs": 20, "max_tokens": context - 64},
            "n12_top5": sampled | {"n": 12, "top_logprobs": 5, "max_tokens": 1024},
        }
        for name, body in heavy.items():
            if name not in mixes:
                continue
            background = _Background(url, [body])
            time.sleep(1.0)
            results = [_probe(http, url) for _ in range(probes)]
            background.stop()
            report[name] = _ttft(results) | {"heavy": background.outcome.get(0)}
            _wait_idle(root)
        if "long_prompts" not in mixes:
            return report
        words = " ".join(["the quick brown fox jumps over the lazy dog"] * 110)  # ~1,000 tokens
        long = {
            "messages": [{"role": "user", "content": f"Summarise this text: {words}"}],
            "max_tokens": 64,
            "linalign": {"method": "la", "principle": PRINCIPLES[2]},
        }
        results, outcomes = [], []
        for _ in range(rounds):
            background = _Background(url, [long] * 8)
            time.sleep(0.3)
            results.append(_probe(http, url))
            background.stop()
            outcomes.append(background.outcome)
            _wait_idle(root)
        report["long_prompts"] = _ttft(results) | {
            "statuses": sorted({o["status"] for r in outcomes for o in r.values()})
        }
    return report


def shutdown_time(command: list[str], port: int, streams: int = 4, max_tokens: int = 1500, cap: float = 120) -> dict:
    """Start a server with `command` (listening on `port`), run `streams` long streams, send SIGTERM once each has
    its first token, and time how long the process takes to exit (killed after `cap` seconds)."""
    import signal
    import subprocess

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{root}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": QUESTIONS[2]}], "max_tokens": max_tokens}
        body |= {
            "temperature": 1.8,
            "seed": 3,
            "linalign": {"method": "la", "principle": PRINCIPLES[2]},
        }  # rarely an EOS
        background = _Background(url, [body] * streams)
        with httpx.Client(timeout=10) as http:
            # Every stream admitted or queued: the KV cache may hold fewer at full length than were sent.
            while time.monotonic() < deadline:
                health = http.get(f"{root}/health").json()
                if health["running"] and health["running"] + health["queued"] >= streams:
                    break
                time.sleep(0.1)
            time.sleep(1.0)
            running = http.get(f"{root}/health").json()["running"]
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(cap)
            exited = round(time.monotonic() - start, 2)
        except subprocess.TimeoutExpired:
            exited = None
        background.stop()
        return {
            "streams": streams,
            "running_at_signal": running,
            "max_tokens": max_tokens,
            "exit_s": exited,
            "cap_s": cap,
            "ended": background.outcome,
        }
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
