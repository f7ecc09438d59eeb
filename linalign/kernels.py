"""Small-batch matrix products for decode steps on CPU.

A decode step multiplies every weight matrix by a few rows: two per sequence for Linear Alignment. The BLAS
that PyTorch ships for CPUs takes a slow path for `x @ W.T` with a few rows on some processors. On this
project's AMD EPYC, 2 rows cost 2.1x one row, and SmolLM2's 49152 x 576 output layer took 22 ms instead of
10 ms. The same product computed as `(W @ x.T).T` takes 3.5 ms. `TransposedLinears` routes a model's
`nn.Linear` layers through that form for the duration of a step. A short measurement at first use picks the
form per dtype, so CPUs whose BLAS has no such slow path keep PyTorch's own (on the same EPYC, bfloat16
products are faster in PyTorch's form, float32 ones 3-4x faster transposed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from types import MethodType

import torch
from torch import nn
from torch.nn import functional as F

# Rows up to which the transposed form is used: a decode step of 32 sequences x 2 contexts. Only decode
# steps use it at all; prefills keep PyTorch's own form.
MAX_ROWS = 64
# The transposed form must be clearly faster, so that the choice, and the exact floats, stay the same run to run.
MARGIN = 1.25


def _transposed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if not 2 <= rows.shape[0] <= MAX_ROWS:
        return F.linear(x, self.weight, self.bias)
    out = (self.weight @ rows.T).T
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features)


def _best_seconds(fn, repeats: int = 3, calls: int = 4) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - start)
    return best


@cache
def transposed_is_faster(dtype: torch.dtype) -> bool:
    """Whether `(W @ x.T).T` beats `F.linear` by `MARGIN` for 2 rows on this CPU, measured once per dtype
    (~0.2 s) on a weight larger than the caches, as a model's weights are."""
    weight = torch.rand(16384, 1024).to(dtype)
    rows = torch.rand(2, 1024).to(dtype)
    with torch.inference_mode():
        stock = _best_seconds(lambda: F.linear(rows, weight))
        transposed = _best_seconds(lambda: (weight @ rows.T).T)
    return transposed * MARGIN < stock


class TransposedLinears:
    """The linear layers of `model` that decode steps run in the transposed form: all of them on a CPU where
    that form is faster, none elsewhere. A layer whose forward is already replaced on the instance
    (accelerate's offloading hooks) is left alone."""

    def __init__(self, model: nn.Module) -> None:
        weight = next(model.parameters())
        use = weight.device.type == "cpu" and transposed_is_faster(weight.dtype)
        self.linears = (
            [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in vars(m)] if use else []
        )

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the layers use the transposed form; the model is unchanged afterwards."""
        for linear in self.linears:
            linear.forward = MethodType(_transposed_forward, linear)
        try:
            yield
        finally:
            for linear in self.linears:
                del linear.forward
