"""Where models run: a backend holds rows of token sequences with their KV cache and advances them together.

The decode loop (`linalign.decode`) owns everything that is not the model: which rows belong to which
sequence, how their logits combine, masks, processors, sampling and stop handling. A backend only runs
the model. Rows are numbered in the order they were added; `keep` drops rows and keeps the others'
relative order, so row `i` after `keep(rows)` is the row that was `rows[i]` before. A backend whose cache has a
fixed number of KV cells for all rows says so as `kv_capacity` (and the cells its rows hold as `used`); the decode
loop then admits sequences only while their prompts fit, and ends the newest ones early where rows outgrow it.

A long prompt need not be prefilled in one go: a backend with `prefill(prompts) -> Prefill` starts rows to come,
whose prompts are computed a bounded number of tokens at a time (`Prefill.run`) between the steps of the rows
already there, and that become rows once computed (`Prefill.join`); `add` is the same in one go. (A backend
without it, whose rows join only an empty batch, prefills in one go: `Whole`.)

    backend = loaded.open()                       # an empty set of rows over the loaded weights
    logits = backend.add([[1, 2, 3], [1, 4]])     # prefill two rows -> [2, vocab] float32
    logits = backend.step(torch.tensor([5, 6]))   # one token per row -> [2, vocab]
    backend.keep(torch.tensor([1]))               # drop row 0
    coming = backend.prefill([[1, 2, 3, 4, 5]])   # a row to come: nothing computed yet
    coming.run(2)                                 # two of its prompt's tokens (rows may step in between)
    coming.run(coming.left)
    logits = coming.join()                        # now row 1 -> [1, vocab]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Prefill(Protocol):
    """Prompts on their way to becoming rows of a backend, computed a chunk at a time (see the module docstring)."""

    @property
    def left(self) -> int:
        """Prompt tokens still to compute."""
        ...

    def run(self, tokens: int) -> int:
        """Compute about `tokens` more of the prompts (at least one, at most what is left); the tokens computed."""
        ...

    def join(self) -> torch.Tensor:
        """Once nothing is left: the prompts become rows after the existing ones; float32 next-token logits
        `[len(prompts), V]`."""
        ...

    def cancel(self) -> None:
        """Give the prompts up, and the cache they hold."""
        ...


class Backend(Protocol):
    """One model's rows in a decode loop (see the module docstring)."""

    @property
    def rows(self) -> int:
        """How many rows are held now."""
        ...

    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill `prompts` as new rows after the existing ones; float32 next-token logits `[len(prompts), V]`."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens[i]` to row `i` (one per row) and return float32 next-token logits `[rows, V]`."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (ascending indices), freeing the others' cache."""
        ...


class Whole:
    """The `Prefill` of a backend that prefills only in one go (with `add`, at `join`)."""

    def __init__(self, backend: Backend, prompts: Sequence[Sequence[int]]) -> None:
        self.backend, self.prompts = backend, prompts
        self.left = sum(len(p) for p in prompts)

    def run(self, tokens: int) -> int:
        done, self.left = self.left, 0
        return done

    def join(self) -> torch.Tensor:
        return self.backend.add(self.prompts)

    def cancel(self) -> None:
        self.left = 0
