"""The authors' step, written once and plainly, for every test that holds the engine to it (BRIEF, rules 2-4)."""

from __future__ import annotations

from functools import partial

import torch

from linalign import AlignConfig

# The authors' recipe exactly: the default preset adds a loop penalty their code does not have.
Paper = partial(AlignConfig, preset="paper")


def nucleus(logits: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """Rule 3 over the whole sorted vocabulary: a token stays while the mass before it is below `top_p`; the
    most likely token always stays. Works on one row or a batch of rows."""
    probs = torch.softmax(logits / temperature, -1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
    keep[..., 0] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def authors_choice(l_p: torch.Tensor, l_0: torch.Tensor, ratio: float, top_p: float = 0.8) -> torch.Tensor:
    """The authors' greedy choice: argmax of `l_p + r (l_p - l_0)` within the top-p nucleus of softmax(l_p)."""
    combined = (1 + ratio) * l_p - ratio * l_0
    return combined.masked_fill(~nucleus(l_p, top_p), float("-inf")).argmax(dim=-1)
