"""The transposed small-batch product: same numbers as `F.linear`, same tokens, the model left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from linalign import AlignConfig, Aligner, DecodeConfig, kernels
from linalign.kernels import MAX_ROWS, TransposedLinears


@pytest.fixture
def forced(monkeypatch):
    """Use the transposed form whatever this CPU's measurement says, or never."""

    def force(on: bool) -> None:
        monkeypatch.setattr(kernels, "transposed_is_faster", lambda dtype: on)

    return force


@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 1, 48), (8, 1, 48), (MAX_ROWS, 48), (MAX_ROWS + 1, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_transposed_forward_equals_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    got = kernels._transposed_forward(layer, x)
    assert got.shape == (*shape[:-1], 80)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias))


def test_layers_are_restored_and_hooked_ones_left_alone(forced):
    forced(True)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    hooked = model[1]
    hooked.forward = lambda x: x  # as accelerate's offloading replaces it
    linears = TransposedLinears(model)
    assert linears.linears == [model[0]]
    with linears.active():
        assert "forward" in vars(model[0])
    assert "forward" not in vars(model[0]) and "forward" in vars(hooked)


def test_not_used_where_it_is_not_faster(forced):
    forced(False)
    assert TransposedLinears(nn.Linear(8, 8)).linears == []


@pytest.mark.parametrize("method", ["la", "dera"])
def test_engine_tokens_are_the_same_with_either_form(tiny, tiny_other, forced, method):
    prompts = ["What is the capital of France?", "Name three animals that live in the sea, please."]
    align = AlignConfig(method=method, principles=["Answer in lowercase letters only."], lam=0.5)
    runs = []
    for on in (True, False):
        forced(on)
        aligner = Aligner(tiny, reference=tiny_other)
        runs.append([g.token_ids for g in aligner.generate(prompts, align, DecodeConfig(max_new_tokens=16))])
    assert runs[0] == runs[1]
