"""The server under a realistic mix, for `linalign serve-bench --mixed` and `--soak`.

- Mixed load: clients send requests with `max_tokens` drawn from 8–128, half greedy and half sampled with
  seeds, over four principles, streamed so time-to-first-token is measured; one client alone is the baseline.
- Head of line: an 8-token request sent 1.5 s after a 400-token one, against the same request alone.
- Soak: the mixed load with malformed and cost-attack requests interleaved, for a given time; counts every
  status, and the process's memory before and after.
"""

from __future__ import annotations

import random
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
