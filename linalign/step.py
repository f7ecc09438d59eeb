"""The Linear Alignment step on next-token logits, as one pure function: combine, process, mask, warp, choose.

The decode loop, the `transformers` logits processor and the benchmark's two-pass reference all call it, so
the method is written once. Everything here works on a batch of sequences with their own settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from linalign.combine import (
    apply_mask,
    intersect_mask,
    linear_combination,
    min_p_mask,
    plausibility_mask,
    trust_region,
)
from linalign.config import DecodeConfig
from linalign.methods import Plan


def logits_processors(config: DecodeConfig) -> LogitsProcessorList:
    """The standard `transformers` processors, applied to the combined logits (and to the anchor's).
    `min_new_tokens` is the decode loop's: one indexed write for the whole batch, not a vocabulary scan a row."""
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    return processors


def sampling_warpers(config: DecodeConfig) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if not config.do_sample:
        return warpers
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k > 0:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


def masked_scores(
    combined: torch.Tensor, anchor: torch.Tensor, top_p: torch.Tensor | float | None, temperature: torch.Tensor | float
) -> torch.Tensor:
    """`combined` restricted to the nucleus of `softmax(anchor / T)` at `top_p` (per row; 0 or None: no mask),
    falling back to the anchor's own masked logits where nothing of `combined` is left."""
    if top_p is None:
        return combined
    # Which rows are masked is decided on the host: on an accelerator a `.any()` would wait for the device.
    values = top_p.tolist() if isinstance(top_p, torch.Tensor) else top_p
    values = [float(values)] * len(combined) if isinstance(values, (int, float)) else [float(v) for v in values]
    masked = [0 < v < 1 for v in values]
    if not any(masked):
        return combined
    top_p = torch.tensor(values, dtype=torch.float32, device=combined.device)
    if all(masked):
        return apply_mask(combined, plausibility_mask(anchor, top_p, temperature), fallback=anchor)
    rows = torch.tensor([i for i, m in enumerate(masked) if m], device=combined.device)
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=combined.device).expand(len(combined))
    out = combined.clone()
    mask = plausibility_mask(anchor[rows], top_p[rows], temperature[rows])
    out[rows] = apply_mask(combined[rows], mask, fallback=anchor[rows])
    return out


def choose(
    scores: torch.Tensor, do_sample: Sequence[bool], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Argmax for greedy rows; a sample from `softmax(scores)` with the row's own generator for the others."""
    chosen = _argmax(scores)
    for i, sample in enumerate(do_sample):
        if sample:
            probs = torch.softmax(scores[i], dim=-1)
            chosen[i] = torch.multinomial(probs, num_samples=1, generator=generators[i])[0]
    return chosen


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)`; on CPU by numpy, whose vectorised argmax takes 6 us over 49k logits where
    PyTorch's takes 55 (the first maximum either way)."""
    if scores.device.type == "cpu" and scores.dtype == torch.float32 and not scores.requires_grad:
        return torch.from_numpy(scores.numpy().argmax(axis=-1))
    return scores.argmax(dim=-1)


def aligned_scores(
    term_logits: Sequence[torch.Tensor],
    weights: Sequence[float],
    anchor: int,
    top_p: float | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`sum_k w_k l_k` masked to the anchor term's nucleus: the Linear Alignment scores of one plan, for a
    batch of rows that share it (the logits processor's and the benchmark's form of the step)."""
    combined = linear_combination(term_logits, weights)
    return masked_scores(combined, term_logits[anchor].float(), top_p, temperature)


class RepeatGuard:
    """The n-grams a reply already holds, kept as it grows, so the tokens that would repeat one are known
    in O(1) per step: `(n-1)`-gram -> the tokens that followed it."""

    def __init__(self, n: int) -> None:
        self.n, self.tokens = n, []
        self.seen: dict[tuple[int, ...], set[int]] = {}

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            self.seen.setdefault(tuple(self.tokens[-self.n : -1]), set()).add(token)

    def banned(self) -> set[int]:
        """Tokens that would complete an n-gram the reply already contains."""
        if len(self.tokens) < self.n - 1:
            return set()
        return self.seen.get(tuple(self.tokens[len(self.tokens) - self.n + 1 :]), set())


def plan_masks(
    anchor: torch.Tensor, plain: torch.Tensor | None, plans: Sequence[Plan], temperature: Sequence[float]
) -> torch.Tensor:
    """Each row's plausibility mask by its plan's kind (all True where the plan has no mask)."""
    kinds = {p.mask_kind if p.mask_top_p else None for p in plans}
    if len(kinds) == 1 and None not in kinds:  # one kind for the whole batch, the usual case: no row copies
        return _masks(kinds.pop(), anchor, plain, plans, temperature)
    mask = torch.ones_like(anchor, dtype=torch.bool)
    for kind in kinds - {None}:
        rows = [i for i, p in enumerate(plans) if p.mask_top_p and p.mask_kind == kind]
        index = torch.tensor(rows, device=anchor.device)
        mask[index] = _masks(
            kind,
            anchor[index],
            plain[index] if plain is not None else None,
            [plans[i] for i in rows],
            [temperature[i] for i in rows],
        )
    return mask


def _masks(
    kind: str, anchor: torch.Tensor, plain: torch.Tensor | None, plans: Sequence[Plan], temperature: Sequence[float]
) -> torch.Tensor:
    if kind == "min_p":
        return min_p_mask(anchor, [p.mask_min_p for p in plans], temperature)
    if kind == "intersect" and plain is not None:
        return intersect_mask(anchor, plain, [p.mask_top_p for p in plans], temperature)
    return plausibility_mask(anchor, [p.mask_top_p for p in plans], temperature)


def ban(logits: torch.Tensor, banned: Sequence[set[int]]) -> torch.Tensor:
    """`logits` with each row's `banned` tokens at -inf (a copy where any is banned)."""
    pairs = [(i, token) for i, tokens in enumerate(banned) for token in tokens]
    if not pairs:
        return logits
    rows, tokens = zip(*pairs, strict=True)
    logits = logits.clone()
    logits[list(rows), list(tokens)] = float("-inf")
    return logits


def shaped_scores(
    combined: torch.Tensor,
    anchor: torch.Tensor,
    plain: torch.Tensor | None,
    plans: Sequence[Plan],
    temperature: Sequence[float],
    banned: Sequence[set[int]],
) -> torch.Tensor:
    """The step with the quality options of each row's plan: tokens that would repeat an n-gram (`banned`)
    leave every distribution, then each row's kind of mask, the trust region on the contrast (`kl_budget`),
    and the mask with the anchor's fallback. With the paper's options it equals `masked_scores`."""
    combined, anchor = ban(combined, banned), ban(anchor, banned)
    plain = ban(plain, banned) if plain is not None else None
    mask = plan_masks(anchor, plain, plans, temperature)
    trusted = [i for i, p in enumerate(plans) if p.kl_budget is not None]
    if len(trusted) == len(plans):
        combined = trust_region(combined, anchor, mask, [p.kl_budget for p in plans], temperature)
    elif trusted:
        rows = torch.tensor(trusted, device=combined.device)
        budgets = [plans[i].kl_budget for i in trusted]
        t = [temperature[i] for i in trusted]
        combined[rows] = trust_region(combined[rows], anchor[rows], mask[rows], budgets, t)
    return apply_mask(combined, mask, fallback=anchor)
