"""Where models run: a backend holds rows of token sequences with their KV cache and advances them together.

The decode loop (`linalign.decode`) owns everything that is not the model: which rows belong to which
sequence, how their logits combine, masks, processors, sampling and stop handling. A backend only runs
the model. Rows are numbered in the order they were added; `keep` drops rows and keeps the others'
relative order, so row `i` after `keep(rows)` is the row that was `rows[i]` before.

A backend declares what it can do, and the decode loop reads that instead of guessing:

- `kv_capacity`: the KV cells all its rows share where the cache has a fixed size (and `used`, the cells they
  hold); the decode loop then admits sequences only while their prompts fit, and ends the newest ones early
  where rows outgrow it. None where the cache grows as needed.
- `can_merge` / `can_drop`: whether new rows may join while others decode, and whether rows can be dropped now
  (where not, the decode loop feeds finished rows padding until every row has finished).
- `chunked_prefill`: whether `prefill(prompts) -> Prefill` computes the prompts a bounded number of tokens at a
  time (`Prefill.run`) between the steps of the rows already there, so that they become rows once computed
  (`Prefill.join`). Where not, the prompts are computed in one go when they join (`Whole`), and the decode loop
  prefills them as they are added. `add` is `prefill` run to the end and joined.

A `Runner` is what runs a loaded model's weights (llama.cpp's model, or `transformers`'): it opens backends
and answers for the model (its device, context, vocabulary, end-of-sequence ids).

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

    @property
    def kv_capacity(self) -> int | None:
        """KV cells all rows share where the cache has a fixed size; None where it grows as needed."""
        ...

    @property
    def used(self) -> int:
        """KV cells held by the rows, and reserved by the rows to come (counted where `kv_capacity` is set)."""
        ...

    @property
    def can_merge(self) -> bool:
        """Whether new rows may join now, while others decode."""
        ...

    @property
    def can_drop(self) -> bool:
        """Whether `keep` can drop rows now."""
        ...

    @property
    def chunked_prefill(self) -> bool:
        """Whether `prefill` computes prompts a chunk at a time between steps (else in one go, at `join`)."""
        ...

    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill `prompts` as new rows after the existing ones; float32 next-token logits `[len(prompts), V]`."""
        ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefill:
        """Rows to come: `prompts`, to compute (`Prefill.run`) and then join the rows (`Prefill.join`)."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens[i]` to row `i` (one per row) and return float32 next-token logits `[rows, V]`."""
        ...

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (ascending indices), freeing the others' cache."""
        ...


class Runner(Protocol):
    """What runs a loaded model's weights (see the module docstring)."""

    name: str  # the backend's name: "transformers" or "llamacpp"

    @property
    def device(self) -> torch.device: ...

    @property
    def context_length(self) -> int | None:
        """Tokens a row may hold (prompt and new tokens), where the model has a limit."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_ids(self) -> Sequence[int]:
        """The ids the model's own configuration ends a sequence with (the tokenizer's are added to them)."""
        ...

    def open(self, capacity: int | None = None, compile: bool = False) -> Backend:
        """A fresh, empty set of rows (`capacity`: a hint of the KV cells needed; `compile`: a compiled step)."""
        ...


class Whole:
    """The `Prefill` of a backend that prefills only in one go (its own `add`, at `join`)."""

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
