"""Small-batch matrix products for decode steps on CPU.

A decode step multiplies every weight matrix by a few rows: two per sequence for Linear Alignment. The BLAS
that PyTorch ships for CPUs takes a slow path for `x @ W.T` with a few rows on some processors. On this
project's AMD EPYC, 2 rows cost 2.1x one row, and SmolLM2's 49152 x 576 output layer took 22 ms instead of
10 ms. The same product computed as `(W @ x.T).T` takes 3.5 ms.

A step's products must also give a row the same bits whatever else shares the step (batch invariance). The BLAS
switches algorithms, and so rounding, by the number of rows: MKL on this CPU computes 1 row one way, 2-56 rows
another and 57-121 a third (the transposed form; `F.linear` switches at 2, 4, 16 and 57). So inside a step every
product runs in chunks whose row counts lie in one such regime (`stable_rows`, found once per weight shape by
comparing the bits of one row's product at every count): fewer rows are padded with zeros, more are split.

`route(model)` gives each plain `nn.Linear` of a model (exactly that class: quantised subclasses keep their own
`forward`) a `forward` that, inside `step_products()` on the calling thread only, computes products on CPU that
way, and is `F.linear` everywhere else. A flag per thread keeps threads sharing a model and nested use safe.
(A `TorchFunctionMode` would need no change to the model, but it intercepts all ~2,000 torch calls of a step:
+9 ms a step for SmolLM2-135M on this CPU, more than the transposed form saves at 2 rows.)

`LINALIGN_KERNEL=auto|transposed|torch` pins the choice; `auto` (default) measures once per dtype (~0.2 s).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from linalign.errors import LinalignError

# Row counts compared when looking for a regime; a regime must start at or below LOWEST_START (padding to it is cheap).
PROBE_ROWS = 64
LOWEST_START = 16
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


def _product(transposed: bool) -> Callable[..., torch.Tensor]:
    return transposed_linear if transposed else F.linear


_regimes: dict[tuple, tuple[int, int]] = {}


def stable_rows(weight: torch.Tensor, transposed: bool) -> tuple[int, int]:
    """`(lo, hi)`: the widest run of row counts, starting at most at `LOWEST_START`, over which a row's product
    with `weight` has the same bits however many rows share the call (the BLAS's choice depends on the shape, not
    on the values: found once per shape, dtype and form)."""
    key = (tuple(weight.shape), weight.dtype, weight.device, transposed)
    if key not in _regimes:
        product = _product(transposed)
        x = torch.randn(PROBE_ROWS, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
        with torch.inference_mode():
            first = [product(x[:rows], weight)[0] for rows in range(1, PROBE_ROWS + 1)]
        runs, start = [], 1
        for rows in range(2, PROBE_ROWS + 2):
            if rows > PROBE_ROWS or not torch.equal(first[rows - 1], first[start - 1]):
                runs.append((start, rows - 1))
                start = rows
        _regimes[key] = max((r for r in runs if r[0] <= LOWEST_START), key=lambda r: (r[1] - r[0], -r[0]))
    return _regimes[key]


def chunked_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in chunks of row counts within `stable_rows`: each row's bits depend on the row
    alone."""
    rows = x.reshape(-1, x.shape[-1])
    lo, hi = stable_rows(weight, transposed)
    count = rows.shape[0]
    chunks = -(-count // hi)
    size = max(lo, -(-count // chunks))
    padded = torch.nn.functional.pad(rows, (0, 0, 0, chunks * size - count))
    product = _product(transposed)
    out = torch.cat([product(chunk, weight) for chunk in padded.split(size)])[:count]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_active = threading.local()  # `depth`: how many `step_products()` blocks the thread is in; `transposed`: the form


@contextmanager
def step_products(transposed: bool) -> Iterator[None]:
    """Within the block, on the calling thread, products of routed linears are batch-invariant
    (`chunked_product`), in the transposed form or torch's."""
    outer = getattr(_active, "transposed", transposed)
    _active.depth, _active.transposed = getattr(_active, "depth", 0) + 1, transposed
    try:
        yield
    finally:
        _active.depth -= 1
        _active.transposed = outer


def _routed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # torch.compile traces the plain product: the flag is per thread and per call, not part of a graph.
    if not torch.compiler.is_compiling() and getattr(_active, "depth", 0) and x.device.type == "cpu":
        return chunked_product(x, self.weight, self.bias, _active.transposed)
    return F.linear(x, self.weight, self.bias)


def route(model: nn.Module) -> None:
    """Let `step_products()` reach `model`'s plain linear layers (idempotent)."""
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = _routed_forward.__get__(module)
