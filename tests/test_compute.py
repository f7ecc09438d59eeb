"""Tensor work on one thread: decoding runs on the compute thread whichever thread asks; loading on a thread
that ends with it."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from linalign import AlignConfig, Aligner, DecodeConfig, models
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
