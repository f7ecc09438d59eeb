"""Continuous batching: one decode loop for every request, owned by the compute thread that runs the model.

The batcher lives on linalign's compute thread (`linalign.compute.Resident`): each of its turns admits waiting
requests and runs one decode step there, so a token is computed, chosen and turned into text on that one thread
and crosses threads once, to the event loop that streams it. Requests are queued from the event loop. Between
decode steps the batcher admits waiting requests (their
prompts prefilled together, then merged into the running batch) and finished ones leave. Every request keeps its
own settings (method, principles, strength, sampling, seed, stop strings, length) inside the shared batch.

Admission keeps a newcomer's time to first token bounded whatever runs already (nothing running is ever paused,
so room is kept instead):

- A request's `n` copies are `n` sequences of the batch. A *short* request (one sequence, at most
  `short_tokens` new tokens) may take any of the `max_batch` places; the others together hold at most
  `share = max_batch - reserve` of them, so `reserve` places are always left to short requests, which each end
  within `short_tokens` steps. No request may ask for more than `share` sequences.
- Where a backend's KV cache has a fixed size (llama.cpp), every request reserves the cells its sequences would
  fill at full length (each context's prompt plus `max_tokens`), so no running sequence is ever cut short by a
  newcomer; requests other than short ones reserve at most three quarters of the cache together, and one whose
  full length would not fit that share has its `max_tokens` lowered to fit (it ends with "length").
- Prompts are prefilled in chunks between decode steps, at most `prefill_chunk` tokens of them per step, the
  prompts with the fewest tokens left first (`linalign.decode`), so neither a running request's next token nor a
  newcomer's short prompt waits for more than one chunk of a long prompt (on `transformers`, one prompt).
  Newcomers admitted together are prefilled in groups of at most a chunk (a prefix they share computed once); a
  longer request alone.
- Requests that are not short keep their order among themselves: the oldest one waiting for places holds them
  as they free up (short ones may still use the reserved places), so a stream of short requests cannot starve it.

On shutdown (`drain`) nothing more is admitted: queued requests end at once, running ones may finish within the
grace period and are then ended with `ShuttingDown`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

from linalign import compute
from linalign.decode import Prepared, kv_cells
from linalign.engine import Aligner
from linalign.errors import LinalignError
from linalign.generation import Generation
from linalign.params import DRY_BREAKERS
from linalign.serve.metrics import ServerMetrics
from linalign.step import breaker_tokens

logger = logging.getLogger(__name__)

LONG_KV_SHARE = 0.75  # of a fixed-size KV cache, what requests other than short ones may reserve together


class DecodingFailed(RuntimeError):
    """The model failed on a step (e.g. out of memory); every request decoding then gets this."""


class RequestTimedOut(RuntimeError):
    """The request ran past the server's deadline."""


class QueueFull(RuntimeError):
    """The server's queue is full; the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server is shutting down: the request was refused, or did not finish within the grace period."""


class Job:
    """One request: one prepared sequence per copy (`n` of them), and each copy's output as it grows."""

    def __init__(self, prepared: list[Prepared], loop: asyncio.AbstractEventLoop, timeout: float | None = None) -> None:
        self.prepared, self.n = prepared, len(prepared)
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.first_token: float | None = None
        self.cancelled = self.timed_out = False
        self.left = self.n
        # Put together on the event loop from the decode loop's deltas, as they are read (`events`).
        self.outputs = [Generation(c, prompt_tokens=self.prompt_tokens) for c in range(self.n)]
        self.short = False  # set by the batcher at submission
        self.cells: dict[int, int] = {}  # KV cells per model one copy fills at full length
        self._loop = loop
        self._events: asyncio.Queue[list[Generation] | Exception | None] = asyncio.Queue()
        self._timers: list[asyncio.TimerHandle] = []

    def arm(self) -> None:
        """On the event loop, once submitted: the deadline holds even while the model is busy (a long prefill), the
        request answered when it passes whatever the model is doing."""
        if self.deadline is not None:
            self._after(
                self.deadline - time.monotonic(), RequestTimedOut("the request ran past the server's time limit")
            )

    def stop_after(self, grace: float) -> None:
        """Thread-safe: end the request with `ShuttingDown` after `grace` seconds, whatever the model is doing."""
        error = ShuttingDown("the server shut down before the request finished (its --shutdown-grace ran out)")
        self._loop.call_soon_threadsafe(self._after, grace, error)

    def _after(self, seconds: float, error: Exception) -> None:
        self._timers.append(self._loop.call_later(max(0.0, seconds), self._expire, error))

    def _expire(self, error: Exception) -> None:
        self.timed_out = True  # the batcher drops its rows at the next step and sends it nothing more
        self._events.put_nowait(error)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens as a client counts them (its own, principled context)."""
        return self.prepared[0].prompt_tokens

    @property
    def max_new_tokens(self) -> int:
        return self.prepared[0].config.max_new_tokens

    @property
    def prefill_tokens(self) -> int:
        """Tokens the model reads to prefill every context of every copy."""
        return sum(len(ids) for p in self.prepared for ids in p.term_ids)

    def cancel(self) -> None:
        """Free this request's rows at the next decode step (the client went away)."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def put(self, item: list[Generation] | Exception | None) -> None:
        """Called from the compute thread: deltas (indexed by copy), an error, or None when every copy is finished."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, item)

    async def events(self) -> AsyncIterator[list[Generation]]:
        """Each step's deltas, once added to `outputs`."""
        try:
            while (item := await self._events.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                for delta in item:
                    self.outputs[delta.index].add(delta)
                yield item
        finally:
            for timer in self._timers:
                timer.cancel()

    async def collect(self) -> list[Generation]:
        """Every copy's output, once finished."""
        async for _ in self.events():
            pass
        return self.outputs


class Batcher:
    """The queue and the decode loop of a server's requests, a resident of the compute thread."""

    def __init__(
        self,
        aligner: Aligner,
        *,
        max_batch: int = 16,
        window: float = 0.02,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        short_tokens: int = 256,
        reserve: int | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.aligner, self.max_batch, self.window = aligner, max_batch, window
        self.max_queue, self.prefill_chunk, self.short_tokens = max_queue, prefill_chunk, short_tokens
        self.reserve = max_batch // 4 if reserve is None else reserve
        if not 0 <= self.reserve < max_batch:
            raise LinalignError(f"reserve must be in [0, max_batch), got {self.reserve} for max_batch {max_batch}")
        self.share = max_batch - self.reserve  # sequences one request, and all but short ones together, may hold
        self.metrics = metrics or ServerMetrics()
        self.batch_sizes: list[int] = []  # sequences decoding at every step
        self.finished: Counter[str] = Counter()  # finish reasons of every sequence
        self._pending: list[Job] = []
        self._running: set[Job] = set()
        self._lock = threading.Lock()  # the queue and the flags below, shared with the event loop's threads
        self._closed = False
        self._accepting = True
        self._drain_at: float | None = None
        self._window_end: float | None = None
        self._decoder = aligner.decoder(prefill_chunk=prefill_chunk)
        # The default loop penalty's breaker tokens (a read of the vocabulary, ~0.05-0.1 s), read once at start
        # rather than in the first Linear Alignment request's time to first token.
        breaker_tokens(aligner.tokenizer, DRY_BREAKERS)
        self._capacity = {m: b.kv_capacity for m, b in self._decoder.backends.items() if b.kv_capacity is not None}
        self._started = False
        self._stopped = threading.Event()  # set when its last turn is over (or a turn failed beyond repair)

    # -- called from the event loop --------------------------------------------------------------------

    def start(self) -> None:
        self._started = True
        compute.host(self)

    @property
    def alive(self) -> bool:
        return self._started and not self._stopped.is_set() and not self._closed

    @property
    def draining(self) -> bool:
        return not self._accepting

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._decoder)

    def submit(self, job: Job) -> None:
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if not self._decoder.fits(job.prepared, alone=True):
                raise LinalignError(
                    "the request's prompts do not fit the server's KV cache (every context of each of n copies); "
                    "shorten the conversation or lower n"
                )
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._plan(job)
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
        compute.wake()

    def drain(self, grace: float) -> None:
        """Begin shutting down: admit nothing more, end queued requests now and running ones after `grace`
        seconds (with `ShuttingDown`); returns at once."""
        with self._lock:
            if self._drain_at is not None:
                return
            self._accepting = False
            self._drain_at = time.monotonic() + max(0.0, grace)
            for job in self._pending:
                self._end(job, ShuttingDown("the server shut down before the request started; retry"))
            self._pending.clear()
            for job in self._running:
                job.stop_after(grace)
            self.metrics.queue_depth.set(0)
        compute.wake()
        logger.info("shutting down: %d running requests get up to %.1f s to finish", len(self._running), grace)

    def close(self, grace: float = 0.0) -> None:
        """Drain (see `drain`), wait for the running requests to end, and leave the compute thread."""
        self.drain(grace)
        deadline = (self._drain_at or time.monotonic()) + 5
        while self.alive and self._running and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._closed = True
        compute.wake()
        if self._started:
            self._stopped.wait(timeout=5)

    def _plan(self, job: Job) -> None:
        """Classify `job` and, on a cache of fixed size, fit its full length into its share (holding the lock)."""
        job.short = job.n == 1 and job.max_new_tokens <= self.short_tokens
        if job.n > self.share:
            raise LinalignError(f"n must be at most {self.share}: one request holds at most that many sequences")
        new = job.max_new_tokens
        for m, capacity in self._capacity.items():
            share = capacity if job.short else int(capacity * LONG_KV_SHARE)
            prompt = kv_cells(job.prepared[0], 0).get(m, 0)
            per_token = kv_cells(job.prepared[0], 1).get(m, 0) - prompt  # the copy's contexts on model m
            if per_token:
                new = min(new, (share // job.n - prompt) // per_token)
        if new < 1:
            raise LinalignError(
                "the request's prompts leave no room in its share of the server's KV cache (every context of each "
                "of n copies); shorten the conversation or lower n"
            )
        if new < job.max_new_tokens:
            job.prepared = [replace(p, config=replace(p.config, max_new_tokens=new)) for p in job.prepared]
        job.cells = kv_cells(job.prepared[0])

    # -- on the compute thread ----------------------------------------------------------------------------

    def due(self) -> float | None:
        """Seconds until the next turn has work: now while sequences decode (or on closing); a moment after the
        first of several requests sent together, so they share one prefill; None while idle."""
        with self._lock:
            if self._closed or self._running:
                return 0.0
            if not self._pending:
                return None
            if self.window <= 0 or self._drain_at is not None:
                return 0.0
            now = time.monotonic()
            if self._window_end is None:
                self._window_end = now + self.window
            return self._window_end - now

    def turn(self) -> bool:
        """Admit what fits and run one decode step; False once closed."""
        try:
            return self._turn()
        except BaseException:
            self._stopped.set()  # the compute thread stops hosting it: /health reports it dead
            raise

    def _turn(self) -> bool:
        with self._lock:
            if self._closed:
                self._fail_all(ShuttingDown("the server is shutting down"), pending=True)
                self._stopped.set()
                return False
            self._window_end = None
            newcomers = self._admit() if self._drain_at is None else []
            past_grace = self._drain_at is not None and time.monotonic() >= self._drain_at
        try:
            if past_grace:
                self._fail_all(
                    ShuttingDown("the server shut down before the request finished (its --shutdown-grace ran out)")
                )
            else:
                self._step(newcomers)
        except Exception as err:  # the loop must outlive any one failure
            logger.exception("decoding failed with %d sequences", len(self._decoder))
            self._fail_all(DecodingFailed(f"{type(err).__name__}: {err}"))
        return True

    def _admit(self) -> list[Job]:
        """The waiting requests to prefill before the next step (holding the lock); see the module docstring."""
        now = time.monotonic()
        for job in list(self._pending):
            if job.cancelled or job.expired(now):
                self._pending.remove(job)
                self._end(job, RequestTimedOut("the request timed out in the queue") if job.expired(now) else None)
        if not self._decoder.can_add:
            return []
        rows = sum(j.left for j in self._running)
        short_rows = sum(j.left for j in self._running if j.short)
        cells = {m: sum(j.cells.get(m, 0) * j.left for j in self._running) for m in self._capacity}
        short_cells = {m: sum(j.cells.get(m, 0) * j.left for j in self._running if j.short) for m in self._capacity}
        held_rows, held_cells = 0, dict.fromkeys(self._capacity, 0)  # what the oldest waiting long request needs
        jobs: list[Job] = []
        for job in list(self._pending):
            need = {m: job.cells.get(m, 0) * job.n for m in self._capacity}
            if job.short:
                # Into places and cells a waiting long request is not holding, or into those kept for short ones.
                rows_ok = rows + job.n + held_rows <= self.max_batch or (
                    rows + job.n <= self.max_batch and short_rows + job.n <= self.reserve
                )
                cells_ok = all(
                    cells[m] + need[m] + held_cells[m] <= c
                    or (cells[m] + need[m] <= c and short_cells[m] + need[m] <= c - int(c * LONG_KV_SHARE))
                    for m, c in self._capacity.items()
                )
            else:
                rows_ok = not held_rows and rows + job.n <= self.max_batch and rows - short_rows + job.n <= self.share
                cells_ok = all(
                    cells[m] + need[m] <= c and cells[m] - short_cells[m] + need[m] <= int(c * LONG_KV_SHARE)
                    for m, c in self._capacity.items()
                )
            if not (rows_ok and cells_ok):
                if not job.short and not held_rows:
                    held_rows, held_cells = job.n, need
                continue
            if not self._decoder.fits([p for j in (*jobs, job) for p in j.prepared]):
                continue  # the cells of sequences just finished are not free yet
            self._pending.remove(job)
            jobs.append(job)
            rows += job.n
            for m in self._capacity:
                cells[m] += need[m]
            if job.short:
                short_rows += job.n
                for m in self._capacity:
                    short_cells[m] += need[m]
        self.metrics.queue_depth.set(len(self._pending))
        return jobs

    def _step(self, newcomers: list[Job]) -> None:
        if newcomers:
            self._running.update(newcomers)  # first: a failing prefill must answer them too
            for group in self._groups(newcomers):
                self._decoder.add_many([((job, c), p) for job in group for c, p in enumerate(job.prepared)])
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
        deltas: dict[Job, list[Generation]] = {}
        for e in self._decoder.step():
            job, copy = e.key
            if e.token is not None:
                self._count_token(job)
            deltas.setdefault(job, []).append(replace(e, index=copy))
            if e.finish_reason:
                self.finished[e.finish_reason] += 1
                job.left -= 1
        for job, items in deltas.items():
            if not job.timed_out:
                job.put(items)
            if not job.left:  # answer now, while the rest of the batch decodes on
                self._running.discard(job)
                self._end(
                    job, RequestTimedOut("the request ran past the server's time limit") if job.timed_out else None
                )
        self.metrics.running.set(len(self._decoder))

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Newcomers in the groups prefilled together: the smallest first, in groups of at most one chunk (or one
        request, where it alone is longer), so a short prompt never waits for the end of a long one's prefill."""
        groups: list[list[Job]] = []
        tokens = 0
        for job in sorted(jobs, key=lambda j: j.prefill_tokens):
            if not groups or tokens + job.prefill_tokens > self.prefill_chunk:
                groups.append([])
                tokens = 0
            groups[-1].append(job)
            tokens += job.prefill_tokens
        return groups

    def _count_token(self, job: Job) -> None:
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
        self._decoder = self.aligner.decoder(
            prefill_chunk=self.prefill_chunk
        )  # whatever the failed step left in the caches is dropped
        if pending:  # holding the lock
            for job in self._pending:
                self._end(job, error)
            self._pending.clear()
