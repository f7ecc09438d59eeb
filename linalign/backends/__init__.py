"""Where models run: a backend holds rows of token sequences with their KV cache and advances them together.

The decode loop (`linalign.decode`) owns everything that is not the model: which rows belong to which
sequence, how their logits combine, masks, processors, sampling and stop handling. A backend only runs
the model. Rows are numbered in the order they were added; `keep` drops rows and keeps the others'
relative order, so row `i` after `keep(rows)` is the row that was `rows[i]` before. A backend whose cache has a
fixed number of KV cells for all rows says so as `kv_capacity` (and the cells its rows hold as `used`); the decode
loop then admits sequences only while their prompts fit, and ends the newest ones early where rows outgrow it.

    backend = loaded.open()                       # an empty set of rows over the loaded weights
    logits = backend.add([[1, 2, 3], [1, 4]])     # prefill two rows -> [2, vocab] float32
    logits = backend.step(torch.tensor([5, 6]))   # one token per row -> [2, vocab]
    backend.keep(torch.tensor([1]))               # drop row 0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


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
