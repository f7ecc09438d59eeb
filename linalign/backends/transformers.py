"""The `transformers` backend: rows are one left-padded batch of a Hugging Face causal LM with one KV cache.

New rows are prefilled and stacked into the running cache (their keys and values left-padded to the same
length), so new sequences can join a batch between decode steps. On CPU the backend is batch-invariant: each
row is prefilled on its own, unpadded, and a step runs its matrix products in chunks one BLAS kernel handles
(`linalign.kernels`) and its attention row by row (`linalign.backends.row_attention`), so a row's logits are
those of the row alone whatever shares the batch. Rows are dropped
from the cache with `batch_select_indices`, and left-padding columns that no row needs any more are trimmed.
Caches whose layers are not plain key/value stores (recurrent or linear-attention states) cannot be merged
or trimmed, and some cannot drop rows either: `can_merge` / `can_drop` say so, and the decode loop then keeps
such rows (feeding them padding) instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from linalign.backends.row_attention import rows_attention
from linalign.kernels import plain_linears, routed, step_products, uses_transposed


def left_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """`(input_ids, attention_mask, position_ids)` of `rows` left-padded to one width; positions count
    real tokens only, so a padded row sees the positions it would see alone."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _cache_argument(model: PreTrainedModel) -> str:
    # transformers 5 renamed the KV cache `past_key_values` -> `cache`; older releases know only the first name.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _pad_left(t: torch.Tensor, columns: int) -> torch.Tensor:
    """`t` (`[rows, heads, length, dim]`) with `columns` zero positions in front."""
    if columns == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], columns, t.shape[3]), t], dim=2)


def _plain(cache) -> bool:
    """Whether `cache` holds plain key/value layers only, which can be left-padded and stacked."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class TransformersPrefill:
    """Rows to come of a `TransformersBackend` (the `linalign.backends.Prefill` protocol), prefilled a whole prompt
    at a time: with batch invariance each prompt alone, unpadded (a prompt cut in chunks would move its logits by
    float rounding, and with them its tokens), otherwise all of them padded together in one pass. A step therefore
    waits for one prompt at most, not for one chunk."""

    def __init__(self, backend: TransformersBackend, prompts: Sequence[Sequence[int]]) -> None:
        self.backend, self.prompts = backend, [list(p) for p in prompts]
        self.done = 0  # prompts computed
        self.parts: list[tuple] = []  # (cache, attention_mask) of the prompts computed
        self.logits: list[torch.Tensor] = []
        self.last: list[torch.Tensor] = []  # last positions

    @property
    def left(self) -> int:
        return sum(len(p) for p in self.prompts[self.done :])

    @torch.inference_mode()
    def run(self, tokens: int) -> int:
        spent, backend = 0, self.backend
        while self.done < len(self.prompts) and (not spent or spent + len(self.prompts[self.done]) <= tokens):
            prompt = self.prompts[self.done]
            alone = backend._alone(prompt) if backend.invariant and backend._stackable is not False else None
            if alone is None:  # every prompt left, padded together
                rest = self.prompts[self.done :]
                logits, part, last = backend._padded(rest)
                self.logits.append(logits)
                self.parts.append(part)
                self.last.append(last)
                self.done = len(self.prompts)
                return spent + sum(map(len, rest))
            self.logits.append(alone[0])
            self.parts.append(alone[1])
            self.last.append(torch.tensor([len(prompt) - 1], dtype=torch.long, device=backend.device))
            self.done += 1
            spent += len(prompt)
        return spent

    @torch.inference_mode()
    def join(self) -> torch.Tensor:
        if self.left:
            raise RuntimeError(f"{self.left} prompt tokens are still to prefill")
        self.backend._join(self.parts, torch.cat(self.last))
        return torch.cat(self.logits)

    def cancel(self) -> None:
        self.parts, self.logits = [], []


class TransformersBackend:
    """Rows of one `transformers` model (see `linalign.backends`)."""

    kv_capacity = None  # the cache grows as needed
    used = 0
    chunked_prefill = True  # a prompt at a time (`TransformersPrefill`)

    def __init__(self, model: PreTrainedModel, pad_id: int, invariant: bool = True) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = model.device
        # Batch invariance (a row's logits whatever shares its batch, docs/performance.md): on CPU, unless turned
        # off; GPU kernels choose by shape in ways these chunks do not pin down.
        self.invariant = invariant and self.device.type == "cpu"
        self._stackable: bool | None = None  # whether the model's cache can be stacked from rows prefilled alone
        self._cache_name = _cache_argument(model)
        weight = next(model.parameters())
        self._transposed = uses_transposed(weight.device, weight.dtype)
        self._linears = plain_linears(model)  # routed to `step_products` during a step (`_products`)
        self.cache = None
        self.attention_mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.last_position = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def rows(self) -> int:
        return len(self.last_position)

    def _layers(self) -> list:
        return list(getattr(self.cache, "layers", None) or [])

    @property
    def can_merge(self) -> bool:
        """Plain key/value layers only: new rows are left-padded to the running length and stacked."""
        return self.cache is None or _plain(self.cache)

    @property
    def can_drop(self) -> bool:
        layers = self._layers()
        kinds = (DynamicLayer, DynamicSlidingWindowLayer)
        return self.cache is None or (bool(layers) and all(type(layer) in kinds for layer in layers))

    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill `prompts` as new rows (`prefill`, run to the end, joined)."""
        coming = self.prefill(prompts)
        coming.run(coming.left)
        return coming.join()

    def prefill(self, prompts: Sequence[Sequence[int]]) -> TransformersPrefill:
        if self.rows and not self.can_merge:
            raise RuntimeError("this model's cache cannot take new rows while others decode")
        return TransformersPrefill(self, prompts)

    def _alone(self, prompt: Sequence[int]) -> tuple[torch.Tensor, tuple] | None:
        """Prefill `prompt` on its own, unpadded, so its cache and logits are those of the row alone: its logits
        and `(cache, attention_mask)`; None where the model's cache cannot be stacked (then rows are prefilled
        padded together)."""
        logits, part, _ = self._padded([prompt])  # one prompt: no padding
        if self._stackable is None:
            self._stackable = _plain(part[0])
        return (logits, part) if self._stackable else None

    def _padded(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        """Prefill `prompts` left-padded together in one pass: their logits, `(cache, attention_mask)` and last
        positions."""
        ids, mask, positions = left_padded(prompts, self.pad_id, self.device)
        running = self.cache, self.attention_mask
        self.cache, self.attention_mask = None, mask
        try:
            logits = self._forward(ids, positions)
            part = self.cache, self.attention_mask
        finally:
            self.cache, self.attention_mask = running
        return logits, part, positions[:, -1]

    def _join(self, parts: list[tuple], last: torch.Tensor) -> None:
        """Rows prefilled apart (`(cache, attention_mask)` each, in order) after the running ones."""
        self._stack(([(self.cache, self.attention_mask)] if self.rows else []) + parts)
        self.last_position = torch.cat([self.last_position, last])

    def _stack(self, parts: list[tuple]) -> None:
        """One cache of the rows of `parts` (`(cache, attention_mask)` each, in order), left-padded to one width."""
        if len(parts) == 1:
            self.cache, self.attention_mask = parts[0]
            return
        width = max(mask.shape[1] for _, mask in parts)
        pads = [width - mask.shape[1] for _, mask in parts]
        for layers in zip(*(cache.layers for cache, _ in parts), strict=True):  # one layer of every part
            first = layers[0]
            first.keys = torch.cat([_pad_left(x.keys, pad) for x, pad in zip(layers, pads, strict=True)])
            first.values = torch.cat([_pad_left(x.values, pad) for x, pad in zip(layers, pads, strict=True)])
        pad = torch.nn.functional.pad
        self.attention_mask = torch.cat([pad(mask, (p, 0)) for (_, mask), p in zip(parts, pads, strict=True)])
        self.cache = parts[0][0]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.rows, 1))], 1)
        self.last_position = self.last_position + 1
        with self._step_kernels():
            return self._forward(tokens.to(self.device)[:, None], self.last_position[:, None])

    def _step_kernels(self) -> AbstractContextManager:
        """Batch-invariant products and attention for a step (`linalign.kernels`, `row_attention`), or the
        transposed form alone where invariance is off."""
        if not self.invariant:
            return self._products(transposed=True, invariant=False) if self._transposed else nullcontext()
        stack = self._products(self._transposed)
        stack.enter_context(rows_attention(self.model))
        return stack

    def _products(self, transposed: bool, invariant: bool = True) -> ExitStack:
        """The model's plain linears routed to `step_products` for the step only: the model is left as it was."""
        stack = ExitStack()
        stack.enter_context(routed(self.model, self._linears))
        stack.enter_context(step_products(transposed, invariant))
        return stack

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self.attention_mask = self.attention_mask[rows]
        self.last_position = self.last_position[rows]
        if len(rows) == 0:
            self.cache = None
            return
        self.cache.batch_select_indices(rows)
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row (the longest prompt has left)."""
        if not self.can_merge:
            return
        unused = int(self.attention_mask.argmax(dim=1).min())  # first real token of the row padded least
        if unused:
            self.attention_mask = self.attention_mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_name: self.cache},
        )
        self.cache = getattr(out, self._cache_name)
        return out.logits[:, -1, :].float()
