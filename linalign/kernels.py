"""Small-batch matrix products for decode steps on CPU.

A decode step multiplies every weight matrix by a few rows: two per sequence for Linear Alignment. The BLAS
that PyTorch ships for CPUs takes a slow path for `x @ W.T` with a few rows on some processors. On this
project's AMD EPYC, 2 rows cost 2.1x one row, and SmolLM2's 49152 x 576 output layer took 22 ms instead of
10 ms. The same product computed as `(W @ x.T).T` takes 3.5 ms.

`route(model)` gives each plain `nn.Linear` of a model (exactly that class: quantised subclasses keep their own
`forward`) a `forward` that, inside `transposed_linears()` on the calling thread only, computes 2-64-row
products on CPU that way, and is `F.linear` everywhere else. A flag per thread keeps threads sharing a model and
nested use safe. (A `TorchFunctionMode` would need no change to the model, but it intercepts all ~2,000 torch
calls of a step: +9 ms a step for SmolLM2-135M on this CPU, more than the transposed form saves at 2 rows.)

`LINALIGN_KERNEL=auto|transposed|torch` pins the choice; `auto` (default) measures once per dtype (~0.2 s).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from linalign.errors import LinalignError

# Rows up to which the transposed form is used: a decode step of 32 sequences x 2 contexts.
MAX_ROWS = 64
# The transposed form must be clearly faster, so that the choice, and the exact floats, stay the same run to run.
MARGIN = 1.25
CHOICES = ("auto", "transposed", "torch")


def kernel_choice() -> str:
    """The user's pin from `LINALIGN_KERNEL`, validated."""
    choice = os.environ.get("LINALIGN_KERNEL", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise LinalignError(f"LINALIGN_KERNEL must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def transposed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed as `(W @ x.T).T`."""
    rows = x.reshape(-1, x.shape[-1])
    out = (weight @ rows.T).T
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


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
    on a weight larger than the caches, as a model's weights are."""
    weight = torch.rand(16384, 1024).to(dtype)
    rows = torch.rand(2, 1024).to(dtype)
    with torch.inference_mode():
        stock = _best_seconds(lambda: F.linear(rows, weight))
        transposed = _best_seconds(lambda: transposed_linear(rows, weight))
    return transposed * MARGIN < stock


def uses_transposed(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps on `device` in `dtype` take the transposed form (the pin, else the measurement)."""
    choice = kernel_choice()
    if device.type != "cpu" or choice == "torch":
        return False
    return choice == "transposed" or transposed_is_faster(dtype)


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """'transposed' or 'torch': recorded with results so that runs made with different kernels never mix."""
    return "transposed" if uses_transposed(device, dtype) else "torch"


_active = threading.local()  # `depth`: how many `transposed_linears()` blocks the thread is in


@contextmanager
def transposed_linears() -> Iterator[None]:
    """Within the block, on the calling thread, few-row products of routed linears use the transposed form."""
    _active.depth = getattr(_active, "depth", 0) + 1
    try:
        yield
    finally:
        _active.depth -= 1


def _routed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # torch.compile traces the plain product: the flag is per thread and per call, not part of a graph.
    if not torch.compiler.is_compiling() and getattr(_active, "depth", 0) and x.device.type == "cpu":
        rows = x.numel() // max(x.shape[-1], 1)
        if 2 <= rows <= MAX_ROWS:
            return transposed_linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def route(model: nn.Module) -> None:
    """Let `transposed_linears()` reach `model`'s plain linear layers (idempotent)."""
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = _routed_forward.__get__(module)
