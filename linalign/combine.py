"""The plausibility masks and the trust region on next-token logits (the sampler chain's stages call them).

Every method is a weighted sum of next-token logits whose weights add up to one, so combining raw
logits or log-probabilities gives the same distribution; raw logits keep `r = 0` identical to plain
decoding even under logits processors such as the repetition penalty (`linalign.step.Combine` sums them).
"""

from __future__ import annotations

import torch

_NUCLEUS_GUESS = 256


def _per_row(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-row setting as a `[batch, 1]` column."""
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1, 1).expand(len(like), 1)


def plausibility_mask(
    anchor_logits: torch.Tensor, top_p: torch.Tensor | float, temperature: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Boolean `[batch, vocab]` mask of the nucleus of `softmax(anchor / T)` at `top_p` (scalars or per row).

    A token is kept while the probability mass *before* it (in descending order) is below `top_p`,
    so the most likely token is always kept.
    """
    top_p = _per_row(top_p, anchor_logits)
    probs = torch.softmax(anchor_logits.float() / _per_row(temperature, anchor_logits), dim=-1)
    # The nucleus is usually a handful of tokens: a top-k holding `top_p` of the mass decides it exactly,
    # at a fraction of the cost of sorting the whole vocabulary every step.
    k = min(_NUCLEUS_GUESS, probs.shape[-1])
    top_probs, order = probs.topk(k, dim=-1)
    if (top_probs.sum(dim=-1, keepdim=True) < top_p).any():
        top_probs, order = probs.sort(dim=-1, descending=True)
    keep = (top_probs.cumsum(dim=-1) - top_probs) < top_p
    keep[..., 0] = True
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep)


def apply_mask(logits: torch.Tensor, mask: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Exclude tokens outside `mask`; rows left with no finite logit fall back to `fallback` under the mask."""
    masked = logits.masked_fill(~mask, float("-inf"))
    # no finite logit left: the row's maximum is -inf (or NaN); a max is 5x cheaper than `isfinite().any()`
    empty = ~(masked.amax(dim=-1, keepdim=True) > float("-inf"))
    if masked.device.type == "cpu" and not empty.any():  # elsewhere the select is cheaper than a host sync
        return masked
    return torch.where(empty, fallback.float().masked_fill(~mask, float("-inf")), masked)


def min_p_mask(
    anchor_logits: torch.Tensor, min_p: torch.Tensor | float, temperature: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """Tokens whose probability under `softmax(anchor / T)` is at least `min_p` times the top token's
    (Nguyen et al. 2024, min-p sampling): a cut that scales with the model's confidence."""
    logits = anchor_logits.float() / _per_row(temperature, anchor_logits)
    top = logits.max(dim=-1, keepdim=True).values
    return logits >= top + torch.log(_per_row(min_p, anchor_logits))


def intersect_mask(
    anchor_logits: torch.Tensor,
    plain_logits: torch.Tensor,
    top_p: torch.Tensor | float,
    temperature: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """The anchor's nucleus within the plain distribution's nucleus (both at `top_p`): a token must be
    plausible with and without the principle; the anchor's top token is always kept."""
    mask = plausibility_mask(anchor_logits, top_p, temperature) & plausibility_mask(plain_logits, top_p, temperature)
    return mask.scatter(-1, anchor_logits.argmax(dim=-1, keepdim=True), True)


TRUST_GRID = 64  # the trust region's fractions of the contrast: 0, 1/64, ..., 1


def trust_region(
    combined: torch.Tensor,
    anchor: torch.Tensor,
    mask: torch.Tensor,
    budget: torch.Tensor | float,
    temperature: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """`anchor + s (combined - anchor)` on the tokens of `mask` (-inf elsewhere) per row, with `s` the largest
    of 0, 1/64, ..., 1 such that every grid point up to it keeps `KL(softmax(x / T) || softmax(anchor / T))
    <= budget` on the tokens of `mask`; at `s = 1` exactly `combined`.

    With one principle this is Linear Alignment at `r_t = s r`. The KL grows with `s` (its derivative is
    `s` times a variance), so the first grid point over budget ends the search. All 65 points are evaluated
    at once on the mask's tokens alone, a few dozen per row, so the cost is a few small tensor ops.
    """
    rows, cols, pos, width = _support(mask)
    support = torch.zeros((len(mask), width), dtype=torch.long, device=mask.device)
    valid = torch.zeros((len(mask), width), dtype=torch.bool, device=mask.device)
    support[rows, pos], valid[rows, pos] = cols, True
    a = anchor.float().gather(-1, support)
    c = combined.float().gather(-1, support)
    t = _per_row(temperature, combined)
    grid = torch.linspace(0.0, 1.0, TRUST_GRID + 1, device=combined.device)
    points = (a[:, None, :] + grid[None, :, None] * (c - a)[:, None, :]) / t[:, :, None]
    points = points.masked_fill(~valid[:, None, :], float("-inf"))
    logp = torch.log_softmax(points, dim=-1)
    logq = torch.log_softmax((a / t).masked_fill(~valid, float("-inf")), dim=-1)[:, None, :]
    kl = torch.where(valid[:, None, :], logp.exp() * (logp - logq), 0.0).sum(dim=-1)
    within = (kl <= _per_row(budget, combined)).cumprod(dim=-1)
    s = grid[(within.sum(dim=-1) - 1).clamp(min=0)][:, None]
    trusted = torch.where(s == 1.0, c, a + s * (c - a))
    out = torch.full_like(combined, float("-inf"), dtype=torch.float32)
    out[rows, cols] = trusted[rows, pos]
    return out


def _support(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The tokens of a `[batch, vocab]` mask as (row, token, position within the row, widest row)."""
    counts = mask.sum(dim=-1)
    rows, cols = mask.nonzero(as_tuple=True)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(len(rows), device=mask.device) - starts[rows]
    return rows, cols, pos, max(int(counts.max()), 1)
