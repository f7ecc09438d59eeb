"""The Linear Alignment step on next-token logits, as one pure function: combine, process, mask, warp, choose.

The decode loop, the `transformers` logits processor and the benchmark's two-pass reference all call it, so
the method is written once. Everything here works on a batch of sequences with their own settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from linalign.combine import apply_mask, linear_combination, plausibility_mask
from linalign.config import DecodeConfig


def logits_processors(config: DecodeConfig, eos_ids: list[int], prompt_length: int) -> LogitsProcessorList:
    """The standard `transformers` processors, applied to the combined logits (and to the anchor's)."""
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.min_new_tokens > 0:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos_ids))
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
    top_p = torch.as_tensor(top_p, dtype=torch.float32, device=combined.device).expand(len(combined))
    masked = (top_p > 0) & (top_p < 1)
    if not masked.any():
        return combined
    if masked.all():
        return apply_mask(combined, plausibility_mask(anchor, top_p, temperature), fallback=anchor)
    rows = masked.nonzero().squeeze(1)
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=combined.device).expand(len(combined))
    out = combined.clone()
    mask = plausibility_mask(anchor[rows], top_p[rows], temperature[rows])
    out[rows] = apply_mask(combined[rows], mask, fallback=anchor[rows])
    return out


def choose(
    scores: torch.Tensor, do_sample: Sequence[bool], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """Argmax for greedy rows; a sample from `softmax(scores)` with the row's own generator for the others."""
    chosen = scores.argmax(dim=-1)
    for i, sample in enumerate(do_sample):
        if sample:
            probs = torch.softmax(scores[i], dim=-1)
            chosen[i] = torch.multinomial(probs, num_samples=1, generator=generators[i])[0]
    return chosen


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
