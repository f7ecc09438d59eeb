"""One thread for linalign's tensor work in a process.

PyTorch's CPU ops run on OpenMP, and libgomp keeps a pool of worker threads for every thread that starts
parallel work, for as long as that thread lives. Once the pools together hold more threads than there are
cores, libgomp stops spinning between parallel regions and every op waits for its workers to wake up. On this
project's 2-core machine a decode step then took 1.6-1.9x as long, on every thread of the process: the server
loaded its model on the main thread and decoded on its worker thread, and paid that on every token.

So decoding, scoring and the benchmark run on one long-lived thread: a call from any other thread hands its
work over and waits; a call already on it runs directly. Calls from several threads take turns, one whole call
(one `generate`, one decode step) at a time. Loading runs on a thread of its own that ends with it, taking its
pool along: a program that loads a model with linalign and then runs it on its own thread (`generate` with
linalign's logits processor) keeps one pool too.

Whatever owns the model for as long as it runs (the server's decode loop) lives *on* this thread too, as a
`Resident`: between calls the thread gives each resident with work due one turn (one decode step), so the
resident's steps hand nothing over, and a call from another thread waits for at most one step of each.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger(__name__)


class Resident(Protocol):
    """A loop that owns a model while it lives, run by the compute thread one turn at a time."""

    def due(self) -> float | None:
        """Seconds until it has work (0 or less: now); None while it has none (until `wake`)."""

    def turn(self) -> bool:
        """Do one unit of work (one decode step); False once finished for good."""


_work: queue.SimpleQueue[tuple[Future, Callable[[], object]]] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_residents: list[Resident] = []  # read and changed on the compute thread only


def _forget_parent() -> None:
    """A forked child has no copy of the parent's threads: it starts its own compute thread on first use."""
    global _work, _thread, _start_lock, _residents
    _work, _thread, _start_lock, _residents = queue.SimpleQueue(), None, threading.Lock(), []


os.register_at_fork(after_in_child=_forget_parent)


def _settle(future: Future, call: Callable[[], object]) -> None:
    """Run `call` into `future`: its result, or whatever it raised, for the waiting caller."""
    try:
        future.set_result(call())
    except BaseException as err:  # handed to the caller, whatever it is
        future.set_exception(err)


def _serve() -> None:
    while True:
        _run_handed_over(_wait())
        for resident in [r for r in _residents if (d := r.due()) is not None and d <= 0]:
            _take_turn(resident)


def _wait() -> float | None:
    """How long the thread may wait for a call: not at all while a resident has work due."""
    due = [d for r in _residents if (d := r.due()) is not None]
    return max(0.0, min(due)) if due else None


def _run_handed_over(timeout: float | None) -> None:
    """Run the calls handed over so far, first waiting up to `timeout` seconds (None: for ever) for one; calls
    handed over meanwhile wait for the residents' next turns, so a stream of calls cannot starve them."""
    try:
        items = [_work.get(timeout=timeout) if timeout is None or timeout > 0 else _work.get_nowait()]
    except queue.Empty:
        return
    items += [_work.get_nowait() for _ in range(_work.qsize())]
    for future, call in items:
        if future.set_running_or_notify_cancel():
            _settle(future, call)


def _take_turn(resident: Resident) -> None:
    try:
        if resident.turn():
            return
    except Exception:  # a resident's failure must not stop the thread, nor the other residents
        logger.exception("a resident of the compute thread failed and was stopped")
    _residents.remove(resident)


def host(resident: Resident) -> None:
    """Make `resident` live on the compute thread (from any thread; returns at once)."""
    compute_thread()
    _work.put((Future(), functools.partial(_residents.append, resident)))


def wake() -> None:
    """Have the compute thread ask its residents again whether work is due (from any thread)."""
    _work.put((Future(), _nothing))


def _nothing() -> None:
    return None


def compute_thread() -> threading.Thread:
    """The thread (started on first use; a daemon, so an interrupted program can still exit)."""
    global _thread
    with _start_lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="linalign-compute", daemon=True)
            _thread.start()
    return _thread


def on_compute_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run on the compute thread whatever thread calls it."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        thread = compute_thread()
        if threading.current_thread() is thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        _work.put((future, functools.partial(fn, *args, **kwargs)))
        return future.result()

    return wrapper


def on_own_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, run on a new thread that ends when it returns (and with it, the OpenMP pool its work started)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        future: Future = Future()
        call = functools.partial(fn, *args, **kwargs)
        thread = threading.Thread(target=_settle, args=(future, call), name=f"linalign-{fn.__name__}", daemon=True)
        thread.start()
        thread.join()  # interruptible: Ctrl-C leaves the (daemon) thread behind
        return future.result()

    return wrapper
