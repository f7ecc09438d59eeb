"""The transposed few-row product: the numbers of `x @ W.T + b`, only where asked, only on the calling thread."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from linalign import AlignConfig, Aligner, DecodeConfig, LinalignError, kernels
from linalign.kernels import MAX_ROWS, route, transposed_linears, uses_transposed


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


@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (3, 1, 48), (8, 1, 48), (MAX_ROWS, 48), (2, 5, 48)])
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


def test_only_few_row_products_are_routed(counted):
    layer = routed_linear()
    with transposed_linears():
        for rows in (1, 2, MAX_ROWS, MAX_ROWS + 1):
            out = layer(torch.randn(rows, 8))
            assert out.shape == (rows, 16)
    assert counted == {threading.get_ident(): 2}  # 2 and MAX_ROWS rows; 1 and MAX_ROWS + 1 keep torch's form


def test_subclasses_keep_their_own_forward(counted):
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    layer = Scaled(8, 16)
    route(layer)
    x = torch.randn(2, 8)
    with transposed_linears():
        out = layer(x)
    torch.testing.assert_close(out, 2 * (x @ layer.weight.T + layer.bias))
    assert counted == {}


def test_routing_is_scoped_to_its_thread_and_nests(counted):
    layer, x = routed_linear(), torch.randn(2, 8)
    inside, other = threading.Event(), threading.Event()

    def elsewhere() -> None:
        inside.wait(5)
        layer(x)  # another thread, while the first is inside the block
        other.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    with transposed_linears():
        with transposed_linears():  # nested use
            layer(x)
        inside.set()
        other.wait(5)
        layer(x)
    thread.join()
    layer(x)  # outside again
    assert counted == {threading.get_ident(): 2}


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
