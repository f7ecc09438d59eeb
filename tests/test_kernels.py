"""A decode step's products: the numbers of `x @ W.T + b`, batch-invariant, only where asked, only on the calling
thread."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from linalign import AlignConfig, Aligner, DecodeConfig, LinalignError, kernels
from linalign.kernels import chunk_sizes, chunked_product, route, row_family, step_products, uses_transposed


@pytest.fixture
def counted(monkeypatch) -> dict[int, int]:
    """Calls of the transposed form, by thread id."""
    calls: dict[int, int] = {}
    original = kernels.transposed_linear

    def counting(*args, **kwargs):
        ident = threading.get_ident()
        calls[ident] = calls.get(ident, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "transposed_linear", counting)
    return calls


@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 1, 48), (8, 1, 48), (64, 48), (2, 5, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_linear_equals_the_product(shape, bias):
    torch.manual_seed(0)
    weight, x = torch.randn(80, 48), torch.randn(*shape)
    b = torch.randn(80) if bias else None
    expected = x.double() @ weight.double().T + (b.double() if bias else 0)
    got = kernels.transposed_linear(x, weight, b)
    assert got.shape == (*shape[:-1], 80)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def routed_linear() -> nn.Linear:
    layer = nn.Linear(8, 16)
    route(layer)
    route(layer)  # idempotent
    return layer


def test_without_invariance_a_step_takes_the_form_in_one_call(counted, monkeypatch):
    """Invariance off: the transposed form on the rows as they are, no chunks and no padding."""
    layer, x = routed_linear(), torch.randn(3, 8)

    def no_chunks(*args):
        raise AssertionError("chunked_product called with invariance off")

    monkeypatch.setattr(kernels, "chunked_product", no_chunks)
    with step_products(transposed=True, invariant=False):
        out = layer(x)
    assert torch.equal(out, kernels.transposed_linear(x, layer.weight, layer.bias))
    assert counted == {threading.get_ident(): 2}  # the step's call and the reference's


def test_routed_products_take_the_chosen_form_only_inside_a_step(counted):
    layer = routed_linear()
    with step_products(transposed=True):
        for rows in (1, 2, 64, 65):
            out = layer(torch.randn(rows, 8))
            assert out.shape == (rows, 16)
    with step_products(transposed=False):
        layer(torch.randn(2, 8))
    layer(torch.randn(2, 8))  # outside a step: torch's product
    assert counted[threading.get_ident()] >= 4


def test_chunks_cover_the_rows_with_sizes_of_the_family():
    family = (2, 3, 4, 8, 16)
    assert chunk_sizes(1, family) == [2]
    assert chunk_sizes(5, family) == [8]
    assert chunk_sizes(16, family) == [16]
    assert chunk_sizes(37, family) == [16, 16, 8]


@pytest.mark.parametrize("transposed", [True, False], ids=["transposed", "torch"])
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (960, 2560)])
def test_a_rows_product_has_the_same_bits_whatever_shares_the_call(transposed, shape):
    """Plain products round a row differently by the number of rows in the call and by its place among them
    (MKL with AVX-512: 1 | 2-56 | 57-121 rows in the transposed form; with AVX2 the rows after each block of 16
    differ); chunked ones give every row its bits alone, at any count and position."""
    weight = torch.randn(*shape) / shape[1] ** 0.5
    x = torch.randn(130, shape[1])
    assert len(row_family(weight, transposed)) >= 2
    alone = torch.cat([chunked_product(x[i : i + 1], weight, None, transposed) for i in range(len(x))])
    for rows in (1, 2, 3, 15, 16, 17, 56, 57, 64, 121, 122, 130):
        together = chunked_product(x[:rows], weight, None, transposed)
        assert torch.equal(together, alone[:rows]), rows
    torch.testing.assert_close(alone, x @ weight.T, rtol=1e-5, atol=1e-5)


def test_subclasses_keep_their_own_forward(counted):
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    layer = Scaled(8, 16)
    route(layer)
    x = torch.randn(2, 8)
    with step_products(transposed=True):
        out = layer(x)
    torch.testing.assert_close(out, 2 * (x @ layer.weight.T + layer.bias))
    assert counted == {}


def test_routing_is_scoped_to_its_thread_and_nests(counted):
    layer, x = routed_linear(), torch.randn(2, 8)
    row_family(layer.weight, transposed=True)  # the family is found once per shape: not counted below
    counted.clear()
    inside, other = threading.Event(), threading.Event()

    def elsewhere() -> None:
        inside.wait(5)
        layer(x)  # another thread, while the first is inside the block
        other.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    with step_products(transposed=True):
        with step_products(transposed=True):  # nested use
            layer(x)
        inside.set()
        other.wait(5)
        layer(x)
    thread.join()
    layer(x)  # outside again
    assert counted == {threading.get_ident(): 2}


def test_batch_invariance_is_on_unless_turned_off(tiny, monkeypatch):
    """On by default; off by `load_model(..., batch_invariant=False)` or `LINALIGN_BATCH_INVARIANT=0`."""
    from linalign.models import load_model

    assert tiny.batch_invariant and tiny.open().invariant
    assert not load_model(tiny.source, batch_invariant=False).open().invariant
    monkeypatch.setenv("LINALIGN_BATCH_INVARIANT", "0")
    assert not load_model(tiny.source).batch_invariant
    assert load_model(tiny.source, batch_invariant=True).open().invariant
    monkeypatch.setenv("LINALIGN_BATCH_INVARIANT", "sometimes")
    with pytest.raises(LinalignError, match="LINALIGN_BATCH_INVARIANT must be 1 or 0"):
        load_model(tiny.source)


def test_the_choice_can_be_pinned(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("LINALIGN_KERNEL", "torch")
    assert not uses_transposed(cpu, torch.float32)
    monkeypatch.setenv("LINALIGN_KERNEL", "transposed")
    assert uses_transposed(cpu, torch.float32) and kernels.describe(cpu, torch.float32) == "transposed"
    assert not uses_transposed(torch.device("cuda"), torch.float32)
    monkeypatch.setenv("LINALIGN_KERNEL", "fast")
    with pytest.raises(LinalignError, match="LINALIGN_KERNEL must be one of auto, transposed, torch"):
        uses_transposed(cpu, torch.float32)


@pytest.mark.parametrize("method", ["la", "dera"])
def test_engine_tokens_are_the_same_with_either_form(tiny, tiny_other, monkeypatch, counted, method):
    prompts = ["What is the capital of France?", "Name three animals that live in the sea, please."]
    align = AlignConfig(method=method, principles=["Answer in lowercase letters only."], lam=0.5)
    runs = []
    for kernel in ("transposed", "torch"):
        monkeypatch.setenv("LINALIGN_KERNEL", kernel)
        aligner = Aligner(tiny, reference=tiny_other)
        runs.append([g.token_ids for g in aligner.generate(prompts, align, DecodeConfig(max_new_tokens=16))])
    assert counted  # the first run did take the transposed form
    assert runs[0] == runs[1]


def test_two_threads_decoding_one_aligner(tiny, monkeypatch):
    """Concurrent calls on one Aligner (and one model) give the single-threaded outputs."""
    monkeypatch.setenv("LINALIGN_KERNEL", "transposed")
    aligner = Aligner(tiny)
    align = AlignConfig(method="la", principles=["Answer in lowercase letters only."])
    prompts = [["What is the capital of France?", "Say hi."], ["Name three animals.", "Why is the sky blue?"]]
    config = DecodeConfig(max_new_tokens=24)
    alone = [[g.token_ids for g in aligner.generate(p, align, config)] for p in prompts]
    together: list = [None, None]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                together[i] = [g.token_ids for g in aligner.generate(prompts[i], align, config)]
        except BaseException as err:  # reported below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert together == alone
