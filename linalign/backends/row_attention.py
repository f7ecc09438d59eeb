"""Decode-step attention that gives each row the same bits whatever shares its batch.

In a batched step, rows are left-padded to the longest one. Stock SDPA then sums a row's keys at positions that
depend on that padding (vector lanes, blocks of its kernel), so a row's output moves by ~1e-7 with its
companions, enough for Linear Alignment's `1 + r` to flip a near-tie. Here a step's attention runs one row at a
time over that row's own keys, with its query heads packed per key/value head (`[kv_heads, groups, dim]`, one
kernel call a row, no repeated keys): the same call, on the same numbers, as for the row alone. Prefill runs
unpadded rows (`TransformersBackend.add`) and keeps stock SDPA.

`rows_attention(model)` switches a model from `sdpa` to this for the duration of a block only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "linalign_rows"


def _first_keys(attention_mask: torch.Tensor | None, rows: int, width: int) -> list[int] | None:
    """Each row's first visible key, or None where a row's visible keys are not one run up to the last."""
    if attention_mask is None:
        return [0] * rows
    visible = attention_mask[:, 0, -1, :]
    visible = visible if visible.dtype == torch.bool else visible == 0  # additive float masks: 0 where visible
    first = visible.int().argmax(-1)
    if not bool((visible.sum(-1) == width - first).all()):
        return None
    return first.tolist()


def row_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: `query` `[rows, heads, q, dim]`, `key`/`value` `[rows, kv_heads,
    width, dim]`; returns `[rows, q, heads, dim]`. One-token steps go row by row; anything else is stock SDPA."""
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    first = _first_keys(attention_mask, rows, key.shape[2]) if length == 1 and not kwargs.get("dropout") else None
    if first is None or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = query.new_empty(rows, kv_heads, heads // kv_heads, dim)
    for i, start in enumerate(first):
        packed = query[i].view(1, kv_heads, heads // kv_heads, dim)
        out[i] = F.scaled_dot_product_attention(
            packed, key[i : i + 1, :, start:], value[i : i + 1, :, start:], scale=scaling
        )[0]
    return out.view(rows, 1, heads, dim), None


@contextmanager
def rows_attention(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, `model` (if it runs `sdpa`) attends with `row_attention`."""
    config = model.config
    if config._attn_implementation != "sdpa":
        yield
        return
    if NAME not in AttentionInterface._global_mapping:  # registered on first use, not on import
        AttentionInterface.register(NAME, row_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
