"""Continuous batching: one worker thread owns the model and runs one decode loop for every request.

Requests are queued from the event loop. Between decode steps the worker admits waiting requests (their
prompts prefilled together, then merged into the running batch) and finished ones leave, so a short request
never waits for a long one. Every request keeps its own settings (method, principles, strength, sampling,
seed, stop strings, length) inside the shared batch. Admission is bounded: at most `max_batch` sequences
decode at once and at most `max_prefill_tokens` prompt tokens are prefilled between two steps, so newcomers
never stall running streams for long; the queue holds at most `max_queue` requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

from linalign.decode import Prepared, TopLogprobs
from linalign.engine import Aligner
from linalign.errors import LinalignError
from linalign.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class DecodingFailed(RuntimeError):
    """The model failed on a step (e.g. out of memory); every request decoding then gets this."""


class RequestTimedOut(RuntimeError):
    """The request ran past the server's deadline."""


class QueueFull(RuntimeError):
    """The server's queue is full; the client should retry later."""


@dataclass
class Chunk:
    """New text of copy `copy` of a request; `tokens` counts its tokens so far; `finish_reason` ends it."""

    copy: int
    text: str
    finish_reason: str | None
    tokens: int
    token: int | None = None
    logprobs: TopLogprobs | None = None


@dataclass
class Completion:
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list[tuple[int, TopLogprobs]] | None = None


class Job:
    """One request: one prepared sequence per copy (`n` of them)."""

    def __init__(self, prepared: list[Prepared], loop: asyncio.AbstractEventLoop, timeout: float | None = None) -> None:
        self.prepared, self.n = prepared, len(prepared)
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.first_token: float | None = None
        self.cancelled = self.timed_out = False
        self.left = self.n
        self.tokens = [0] * self.n
        self._loop = loop
        self._events: asyncio.Queue[list[Chunk] | Exception | None] = asyncio.Queue()

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens as a client counts them (its own, principled context)."""
        return self.prepared[0].prompt_tokens

    @property
    def prefill_tokens(self) -> int:
        """Tokens the model reads to prefill every context of every copy."""
        return sum(len(ids) for p in self.prepared for ids in p.term_ids)

    def cancel(self) -> None:
        """Free this request's rows at the next decode step (the client went away)."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def put(self, item: list[Chunk] | Exception | None) -> None:
        """Called from the worker thread: chunks, an error, or None when every copy is finished."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    async def events(self) -> AsyncIterator[list[Chunk]]:
        while (item := await self._events.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item

    async def collect(self) -> list[Completion]:
        completions = [Completion() for _ in range(self.n)]
        async for chunks in self.events():
            for chunk in chunks:
                done = completions[chunk.copy]
                done.text += chunk.text
                done.finish_reason, done.tokens = chunk.finish_reason, chunk.tokens
                if chunk.logprobs is not None:
                    done.logprobs = (done.logprobs or []) + [(chunk.token, chunk.logprobs)]
        return completions


class Batcher:
    """The worker thread, its queue and its decode loop."""

    def __init__(
        self,
        aligner: Aligner,
        *,
        max_batch: int = 16,
        window: float = 0.02,
        max_queue: int = 256,
        max_prefill_tokens: int = 512,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.aligner, self.max_batch, self.window = aligner, max_batch, window
        self.max_queue, self.max_prefill_tokens = max_queue, max_prefill_tokens
        self.metrics = metrics or ServerMetrics()
        self.batch_sizes: list[int] = []  # sequences decoding at every step
        self.finished: Counter[str] = Counter()  # finish reasons of every sequence
        self._pending: list[Job] = []
        self._running: set[Job] = set()
        self._wake = threading.Condition()
        self._closed = False
        self._accepting = True
        self._decoder = aligner.decoder()
        self._thread = threading.Thread(target=self._work, name="linalign-batcher", daemon=True)

    # -- called from the event loop --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._decoder)

    def submit(self, job: Job) -> None:
        with self._wake:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if not self._decoder.fits(job.prepared, alone=True):
                raise LinalignError(
                    "the request's prompts do not fit the server's KV cache (every context of each of n copies); "
                    "shorten the conversation or lower n"
                )
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._wake.notify()

    def close(self, grace: float = 0.0) -> None:
        """Stop admitting; let running requests finish for up to `grace` seconds, then cancel them."""
        with self._wake:
            self._accepting = False
            self._wake.notify()
        deadline = time.monotonic() + grace
        while self._thread.is_alive() and (self._running or self._pending) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=5)

    # -- the worker thread -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._running and not self._closed:
                    self._wake.wait()
                if self._closed:
                    break
                if not self._running and self.window > 0:
                    # Requests sent together arrive a few milliseconds apart: a moment's wait lets them share
                    # one prefill.
                    self._wake.wait(self.window)
                newcomers = self._admit()
            try:
                self._step(newcomers)
            except Exception as err:  # the worker must outlive any one failure
                logger.exception("decoding failed with %d sequences", len(self._decoder))
                self._fail_all(DecodingFailed(f"{type(err).__name__}: {err}"))
        self._fail_all(DecodingFailed("the server is shutting down"), pending=True)

    def _admit(self) -> list[Job]:
        """Take waiting requests while the batch and the step's prefill budget have room (holding the lock)."""
        now, jobs, rows, tokens = time.monotonic(), [], len(self._decoder), 0
        for job in list(self._pending):
            if job.cancelled or job.expired(now):
                self._pending.remove(job)
                self._end(job, RequestTimedOut("the request timed out in the queue") if job.expired(now) else None)
                continue
            if not self._decoder.can_add and (self._running or jobs):
                break
            if rows + job.n > self.max_batch or (jobs and tokens + job.prefill_tokens > self.max_prefill_tokens):
                break
            if not self._decoder.fits([p for j in (*jobs, job) for p in j.prepared]):
                break  # it waits for running sequences to free KV cells
            self._pending.remove(job)
            jobs.append(job)
            rows, tokens = rows + job.n, tokens + job.prefill_tokens
        self.metrics.queue_depth.set(len(self._pending))
        return jobs

    def _step(self, newcomers: list[Job]) -> None:
        if newcomers:
            self._running.update(newcomers)  # first: a failing prefill must answer them too
            self._decoder.add_many([((job, c), p) for job in newcomers for c, p in enumerate(job.prepared)])
        now = time.monotonic()
        for job in self._running:
            if job.expired(now):
                job.timed_out = True
            if job.cancelled or job.timed_out:
                for c in range(job.n):
                    self._decoder.cancel((job, c))
        if not len(self._decoder):
            return
        self.batch_sizes.append(len(self._decoder))
        self.metrics.running.set(len(self._decoder))
        chunks: dict[Job, list[Chunk]] = {}
        for e in self._decoder.step():
            job, copy = e.key
            if e.token is not None:
                self._count_token(job, copy)
            chunk = Chunk(copy, e.text, e.finish_reason, job.tokens[copy], e.token, e.logprobs)
            chunks.setdefault(job, []).append(chunk)
            if e.finish_reason:
                self.finished[e.finish_reason] += 1
                job.left -= 1
        for job, items in chunks.items():
            if not job.timed_out:
                job.put(items)
            if not job.left:  # answer now, while the rest of the batch decodes on
                self._running.discard(job)
                self._end(
                    job, RequestTimedOut("the request ran past the server's time limit") if job.timed_out else None
                )
        self.metrics.running.set(len(self._decoder))

    def _count_token(self, job: Job, copy: int) -> None:
        job.tokens[copy] += 1
        self.metrics.tokens.inc()
        if job.first_token is None:
            job.first_token = time.monotonic()
            self.metrics.time_to_first_token.observe(job.first_token - job.submitted)

    def _end(self, job: Job, error: Exception | None) -> None:
        if error is not None:
            job.put(error)
        job.put(None)
        self.metrics.latency.observe(time.monotonic() - job.submitted)

    def _fail_all(self, error: Exception, pending: bool = False) -> None:
        for job in list(self._running):
            self._end(job, error)
        self._running.clear()
        self._decoder = self.aligner.decoder()  # whatever the failed step left in the caches is dropped
        if pending:
            with self._wake:
                for job in self._pending:
                    self._end(job, error)
                self._pending.clear()
