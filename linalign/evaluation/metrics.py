"""Text metrics that need no judge: length, repetition, and fluency as perplexity under the plain model."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from linalign.backends.transformers import left_padded
from linalign.compute import on_compute_thread
from linalign.models import LoadedModel

_WORD = re.compile(r"\w+(?:'\w+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(text: str, n: int = 2) -> float | None:
    """Share of distinct word n-grams; None when the text has none."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_rate(text: str, n: int = 4) -> float | None:
    """Share of word n-grams that already occurred earlier in the text (degenerate loops score high)."""
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


@on_compute_thread
@torch.inference_mode()
def perplexities(
    loaded: LoadedModel, contexts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], batch_size: int = 8
) -> list[float | None]:
    """Perplexity of each output's tokens given its context, under `loaded` (the alignment tax when the
    context is the prompt *without* the principle). None for empty outputs."""
    results: list[float | None] = []
    device, pad = loaded.device, loaded.tokenizer.pad_token_id
    for start in range(0, len(contexts), batch_size):
        pairs = list(zip(contexts[start : start + batch_size], outputs[start : start + batch_size], strict=True))
        ids, mask, positions = left_padded([list(c) + list(o) for c, o in pairs], pad, device)
        width = ids.shape[1]
        logits = loaded.scoring_model()(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        for i, (_, o) in enumerate(pairs):
            if not o:
                results.append(None)
                continue
            nll = -logprobs[i, width - 1 - len(o) :].mean().item()
            results.append(math.exp(nll))
    return results
