"""Tensor work on one thread: decoding runs on the compute thread whichever thread asks; loading on a thread
that ends with it; a resident loop (the server's) takes turns there with other threads' calls."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from linalign import AlignConfig, Aligner, DecodeConfig, compute, models
from linalign.backends.transformers import TransformersBackend
from linalign.compute import compute_thread, on_compute_thread


@on_compute_thread
def _where(nested: bool = False) -> threading.Thread | tuple[threading.Thread, threading.Thread]:
    here = threading.current_thread()
    return (here, _where()) if nested else here


@on_compute_thread
def _fail() -> None:
    raise ValueError("raised on the compute thread")


def _in_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_calls_from_any_thread_run_on_the_compute_thread():
    assert _where() is compute_thread()
    assert _in_thread(_where) is compute_thread()
    assert compute_thread() is not threading.current_thread()
    # a decorated call made on the compute thread runs there directly instead of waiting for itself
    assert _where(nested=True) == (compute_thread(), compute_thread())


def test_errors_reach_the_caller():
    with pytest.raises(ValueError, match="raised on the compute thread"):
        _fail()
    assert _where() is compute_thread()  # the thread survives the error


def _name_of_compute_thread() -> str:
    return _where().name


def test_a_forked_child_starts_its_own_compute_thread():
    assert _where() is compute_thread()  # running in the parent before the fork
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_name_of_compute_thread).get(timeout=60) == "linalign-compute"


def test_loading_and_decoding_from_two_threads_stay_on_one(tiny, tokenizer, tmp_path, monkeypatch):
    """Loading runs on a thread that has ended by the time the model is back (its pool gone with it), and every
    forward pass on the compute thread, whether the server's worker or the main thread asks."""
    seen: set[threading.Thread] = set()

    def recording(method):
        def record(*args, **kwargs):
            seen.add(threading.current_thread())
            return method(*args, **kwargs)

        return record

    monkeypatch.setattr(TransformersBackend, "add", recording(TransformersBackend.add))
    monkeypatch.setattr(TransformersBackend, "step", recording(TransformersBackend.step))
    from_pretrained = models.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", recording(from_pretrained))
    tiny.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    aligner = Aligner(models.load_model(str(tmp_path)))
    (loader,) = seen
    assert loader not in (compute_thread(), threading.current_thread()) and not loader.is_alive()
    seen.clear()
    align = AlignConfig(method="la", principles=["Answer in lowercase letters only."])
    config = DecodeConfig(max_new_tokens=4)
    here = aligner.generate(["Say hi."], align, config)[0].token_ids
    there = _in_thread(lambda: aligner.generate(["Say hi."], align, config)[0].token_ids)
    streamed = _in_thread(lambda: list(aligner.stream(["Say hi."], align, config)))
    assert here == there and streamed
    assert seen == {compute_thread()}


class Counter:
    """A resident with `turns` turns of work, each recorded with the thread it ran on."""

    def __init__(self, turns: int, fail_at: int | None = None) -> None:
        self.left, self.fail_at = turns, fail_at
        self.threads: list[threading.Thread] = []
        self.done = threading.Event()

    def due(self) -> float | None:
        return 0.0 if self.left else None

    def turn(self) -> bool:
        self.threads.append(threading.current_thread())
        if len(self.threads) == self.fail_at:
            self.done.set()
            raise RuntimeError("a resident failed")
        self.left -= 1
        if not self.left:
            self.done.set()
        return bool(self.left)


def test_residents_take_turns_with_each_other_and_with_handed_over_calls():
    slow = Counter(turns=10**9)  # busy for ever: calls from other threads must still get through
    compute.host(slow)
    try:
        quick = Counter(turns=50)
        compute.host(quick)
        assert quick.done.wait(timeout=30)
        assert _where() is compute_thread()  # a handed-over call waits for turns, not for the resident's end
        assert set(slow.threads) == set(quick.threads) == {compute_thread()}
        failing, after = Counter(turns=5, fail_at=2), Counter(turns=3)
        compute.host(failing)
        assert failing.done.wait(timeout=30)
        compute.host(after)
        assert after.done.wait(timeout=30)  # the thread and the other residents outlive a resident's failure
        assert len(failing.threads) == 2 and len(after.threads) == 3
    finally:
        slow.left = 1  # its next turn is its last: it leaves the thread
        compute.wake()
    assert _where() is compute_thread()


def test_an_idle_resident_is_woken_for_new_work():
    idle = Counter(turns=0)
    compute.host(idle)
    _where()  # the resident is in place once a later call has run
    idle.left = 2
    compute.wake()
    assert idle.done.wait(timeout=30) and len(idle.threads) == 2
