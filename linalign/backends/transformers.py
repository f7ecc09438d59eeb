"""The `transformers` backend: rows are one left-padded batch of a Hugging Face causal LM with one KV cache.

Rows added later are prefilled on their own and merged into the running cache (their keys and values
left-padded to the same length), so new sequences can join a batch between decode steps. Rows are dropped
from the cache with `batch_select_indices`, and left-padding columns that no row needs any more are trimmed.
Caches whose layers are not plain key/value stores (recurrent or linear-attention states) cannot be merged
or trimmed, and some cannot drop rows either: `can_merge` / `can_drop` say so, and the decode loop then keeps
such rows (feeding them padding) instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from linalign.kernels import route, transposed_linears, uses_transposed


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


class TransformersBackend:
    """Rows of one `transformers` model (see `linalign.backends`)."""

    def __init__(self, model: PreTrainedModel, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = model.device
        self._cache_name = _cache_argument(model)
        weight = next(model.parameters())
        self._transposed = uses_transposed(weight.device, weight.dtype)
        if self._transposed:
            route(model)
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
        layers = self._layers()
        return self.cache is None or (bool(layers) and all(type(layer) is DynamicLayer for layer in layers))

    @property
    def can_drop(self) -> bool:
        layers = self._layers()
        kinds = (DynamicLayer, DynamicSlidingWindowLayer)
        return self.cache is None or (bool(layers) and all(type(layer) in kinds for layer in layers))

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        ids, mask, positions = left_padded(prompts, self.pad_id, self.device)
        if self.cache is None or not self.rows:
            self.cache, self.attention_mask = None, mask
            self.last_position = positions[:, -1]
            return self._forward(ids, positions)
        if not self.can_merge:
            raise RuntimeError("this model's cache cannot take new rows while others decode")
        running, running_mask = self.cache, self.attention_mask
        self.cache, self.attention_mask = None, mask
        logits = self._forward(ids, positions)
        self._merge(running, running_mask)
        self.last_position = torch.cat([self.last_position, positions[:, -1]])
        return logits

    def _merge(self, running, running_mask: torch.Tensor) -> None:
        """Put the running rows (`running`, `running_mask`) before the freshly prefilled ones."""
        width = max(running_mask.shape[1], self.attention_mask.shape[1])
        old_pad, new_pad = width - running_mask.shape[1], width - self.attention_mask.shape[1]
        for old, new in zip(running.layers, self.cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, old_pad), _pad_left(new.keys, new_pad)])
            old.values = torch.cat([_pad_left(old.values, old_pad), _pad_left(new.values, new_pad)])
        pad = torch.nn.functional.pad
        self.attention_mask = torch.cat([pad(running_mask, (old_pad, 0)), pad(self.attention_mask, (new_pad, 0))])
        self.cache = running

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.rows, 1))], 1)
        self.last_position = self.last_position + 1
        with transposed_linears() if self._transposed else nullcontext():  # a step has few rows: linalign.kernels
            return self._forward(tokens.to(self.device)[:, None], self.last_position[:, None])

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
