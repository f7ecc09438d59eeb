"""The server's Prometheus metrics, in a registry of its own (several apps may live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("linalign_queue_depth", "Requests waiting to be admitted.", registry=r)
        self.running = Gauge("linalign_running_sequences", "Sequences decoding now.", registry=r)
        self.tokens = Counter("linalign_generated_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("linalign_requests", "Requests accepted.", registry=r)
        self.rejected = Counter("linalign_rejected_requests", "Requests refused, by reason.", ["reason"], registry=r)
        self.latency = Histogram(
            "linalign_request_seconds", "Time from arrival to the last token.", buckets=_SECONDS, registry=r
        )
        self.time_to_first_token = Histogram(
            "linalign_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=_SECONDS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
