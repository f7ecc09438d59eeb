"""Small-batch matrix products for decode steps on CPU.

A decode step multiplies every weight matrix by a few rows: two per sequence for Linear Alignment. The BLAS
that PyTorch ships for CPUs takes a slow path for `x @ W.T` with a few rows on some processors. On this
project's AMD EPYC, 2 rows cost 2.1x one row, and SmolLM2's 49152 x 576 output layer took 22 ms instead of
10 ms. The same product computed as `(W @ x.T).T` takes 3.5 ms.

`transposed_linears()` is a `TorchFunctionMode`: inside it, on the calling thread only, every 2-64-row
`F.linear` on a CPU tensor whose dtype measured faster transposed is computed that way. Nothing on the model
changes, so threads sharing a model, nested use and layers with their own `forward` (quantised subclasses
call `F.linear` only with plain weights, which this computes exactly as they would) are all safe.

`LINALIGN_KERNEL=auto|transposed|torch` pins the choice; `auto` (default) measures once per dtype (~0.2 s).
"""

from __future__ import annotations

import os
import time
from functools import cache

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

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


class TransposedLinears(TorchFunctionMode):
    """Within the block, few-row `F.linear` calls on the calling thread use the transposed form."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            rows = x.numel() // max(x.shape[-1], 1)
            if 2 <= rows <= MAX_ROWS and weight.device.type == "cpu" and weight.dim() == 2:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return transposed_linear(x, weight, bias)
        return func(*args, **kwargs)
