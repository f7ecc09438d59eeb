"""Small-batch matrix products for decode steps on CPU.

A decode step multiplies every weight matrix by a few rows: two per sequence for Linear Alignment. The BLAS
that PyTorch ships for CPUs takes a slow path for `x @ W.T` with a few rows on some processors. On this
project's AMD EPYC, 2 rows cost 2.1x one row, and SmolLM2's 49152 x 576 output layer took 22 ms instead of
10 ms. The same product computed as `(W @ x.T).T` takes 3.5 ms. Which form is faster depends on the threads and
the load: on the same machine idle, with two threads, 2 rows took 2.3 ms with `F.linear` and 8.3 ms transposed.
So `auto` measures, once per dtype.

A step's products must also give a row the same bits whatever else shares the step (batch invariance). The BLAS
picks its kernel, and so its rounding, by shape, and within a call some rows may take another kernel than others:
MKL with AVX-512 computes 1 row one way and 2-56 rows another (the transposed form); with AVX2 it computes 2-8
rows one way and, from 9 rows on, each full block of 16 rows another, the rows left over after the blocks the first
way again. So inside a step every product runs in chunks whose sizes belong to one *family* (`row_family`): sizes
at which every row of a chunk takes the same kernel, and the same one for every size of the family, found once
per weight shape by multiplying one row repeated. A row's bits then depend on the row alone.

`route(model)` gives each plain `nn.Linear` of a model (exactly that class: quantised subclasses keep their own
`forward`) a `forward` that, inside `step_products()` on the calling thread only, computes products on CPU that
way, and is `F.linear` everywhere else. A flag per thread keeps threads sharing a model and nested use safe.
The backend routes a model only for the duration of a step (`routed`): between linalign's steps the user's model
is exactly as it was loaded. (A `TorchFunctionMode` would need no change to the model, but it intercepts all
~2,000 torch calls of a step: +9 ms a step for SmolLM2-135M on this CPU, more than the transposed form saves at
2 rows.)

`LINALIGN_KERNEL=auto|transposed|torch` pins the choice; `auto` (default) measures once per dtype (~0.2 s).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from linalign.errors import LinalignError

# Chunk sizes tried when looking for a family of sizes that give a row the same bits.
PROBE_ROWS = 64
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


_families: dict[tuple, tuple[int, ...]] = {}


def row_family(weight: torch.Tensor, transposed: bool) -> tuple[int, ...]:
    """The chunk sizes (ascending) at which a row's product with `weight` has the same bits at every position of
    the chunk and at every size of the family: the largest such family. The BLAS's choice depends on the shape,
    not on the values, so one row repeated tells it; found once per shape, dtype and form."""
    key = (tuple(weight.shape), weight.dtype, weight.device, transposed)
    if key not in _families:
        product = _product(transposed)
        row = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
        families: dict[bytes, list[int]] = {}
        with torch.inference_mode():
            for size in range(1, PROBE_ROWS + 1):
                out = product(row.expand(size, -1).contiguous(), weight)
                if bool((out == out[0]).all()):
                    families.setdefault(out[0].float().numpy().tobytes(), []).append(size)
        _families[key] = tuple(max(families.values(), key=len))
    return _families[key]


def chunk_sizes(rows: int, family: tuple[int, ...]) -> list[int]:
    """Sizes from `family` whose sum covers `rows`: full chunks of the largest size, then the smallest size that
    holds the rest (padded with zero rows)."""
    largest = family[-1]
    sizes = [largest] * (rows // largest)
    rest = rows - sum(sizes)
    if rest:
        sizes.append(next(size for size in family if size >= rest))
    return sizes


def chunked_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """`F.linear(x, weight, bias)` in chunks of sizes of `row_family`: each row's bits depend on the row alone."""
    rows = x.reshape(-1, x.shape[-1])
    sizes = chunk_sizes(rows.shape[0], row_family(weight, transposed))
    padded = torch.nn.functional.pad(rows, (0, 0, 0, sum(sizes) - rows.shape[0]))
    product = _product(transposed)
    out = torch.cat([product(chunk, weight) for chunk in padded.split(sizes)])[: rows.shape[0]]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_active = threading.local()  # `depth`: how many `step_products()` blocks the thread is in; `form`: their settings


@contextmanager
def step_products(transposed: bool, invariant: bool = True) -> Iterator[None]:
    """Within the block, on the calling thread, products of routed linears take the transposed form or torch's,
    batch-invariant (`chunked_product`) unless `invariant` is False."""
    outer = getattr(_active, "form", (transposed, invariant))
    _active.depth, _active.form = getattr(_active, "depth", 0) + 1, (transposed, invariant)
    try:
        yield
    finally:
        _active.depth -= 1
        _active.form = outer


def _routed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # torch.compile traces the plain product: the flag is per thread and per call, not part of a graph.
    if not torch.compiler.is_compiling() and getattr(_active, "depth", 0) and x.device.type == "cpu":
        transposed, invariant = _active.form
        if invariant:
            return chunked_product(x, self.weight, self.bias, transposed)
        return _product(transposed)(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def plain_linears(model: nn.Module) -> list[nn.Linear]:
    """`model`'s layers of exactly `nn.Linear`, which `route` reaches."""
    return [module for module in model.modules() if type(module) is nn.Linear]


def route(model: nn.Module, layers: Sequence[nn.Linear] | None = None) -> list[nn.Linear]:
    """Let `step_products()` reach `model`'s plain linear layers (or `layers` of it, `plain_linears` found once);
    idempotent: the layers routed by this call."""
    candidates = plain_linears(model) if layers is None else layers
    newly = [layer for layer in candidates if "forward" not in vars(layer)]
    for layer in newly:
        vars(layer)["forward"] = _routed_forward.__get__(layer)  # the instance's own, as a plain assignment sets
    return newly


_routings: dict[int, tuple[int, list[nn.Linear]]] = {}  # id(model) -> (blocks open on it, layers they routed)
_routings_lock = threading.Lock()


@contextmanager
def routed(model: nn.Module, layers: Sequence[nn.Linear] | None = None) -> Iterator[None]:
    """`route(model, layers)` for the block only: once the last block open on `model` (on any thread) ends, its
    layers' `forward` is the class's again."""
    with _routings_lock:
        blocks, done = _routings.get(id(model), (0, []))
        _routings[id(model)] = (blocks + 1, done if blocks else route(model, layers))
    try:
        yield
    finally:
        with _routings_lock:
            blocks, done = _routings.pop(id(model))
            if blocks > 1:
                _routings[id(model)] = (blocks - 1, done)
            else:
                for layer in done:
                    del vars(layer)["forward"]
