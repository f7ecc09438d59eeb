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


# -- the soft loop penalty (DRY) -----------------------------------------------------------------------------------

DRY_MAX_EXCESS = 48  # a match this far past the allowed length already costs more than any logit margin
_BREAKER_SETS: dict[tuple[int, tuple[str, ...]], tuple] = {}


def breaker_tokens(tokenizer, breakers: Sequence[str]) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """The token ids that break a match, as DRY reads breakers on the token level: a token whose text contains
    a breaker. Returns (hard, line, bare): `line` holds the tokens whose only breaker is a newline (they end a
    line), `hard` the others, `bare` the tokens without a letter or digit. Decoded once per tokenizer and
    set of breakers."""
    key = (id(tokenizer), tuple(breakers))
    cached = _BREAKER_SETS.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1:]
    others = [b for b in breakers if b != "\n"]
    newline = "\n" in breakers
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    hard = frozenset(i for i, t in enumerate(texts) if any(b in t for b in others))
    line = frozenset(i for i, t in enumerate(texts) if newline and "\n" in t and i not in hard)
    bare = frozenset(i for i, t in enumerate(texts) if not any(c.isalnum() for c in t))
    _BREAKER_SETS[key] = (tokenizer, hard, line, bare)
    return hard, line, bare


class LoopPenalty:
    """DRY, the soft loop penalty of one sequence, over its reply (the prompt does not count: copying from it
    is free). The reply is kept as it grows (`push`); `penalties()` gives, for the next token, every token `t`
    that would extend a repeat of an earlier span of the reply whose length `L` is at least `allowed`:
    `t` loses `multiplier * base ** (L - allowed)` from its logit. A match runs back from the last token while
    the reply repeats itself, and stops at a breaker token (`hard`); breaker tokens are never penalised.

    Newlines (`line`) stop a match too, except where the line they close repeats an earlier line whole, word for
    word, with a letter or digit in it (a token outside `bare`) and no other breaker: then the match runs on
    through that line. So a frame at the start of differing lines ("\\n- ", "|\\n| ") and lines of punctuation
    alone (a pretty-printed JSON list's " }," and " {") stop the match at the newline as in DRY, while a loop of
    whole lines, which DRY's newline breaker hides (short lines never reach the allowed length), is penalised
    more with every line.
    """

    def __init__(
        self,
        multiplier: float,
        base: float,
        allowed: int,
        hard: frozenset[int],
        line: frozenset[int] = frozenset(),
        bare: frozenset[int] = frozenset(),
    ) -> None:
        self.multiplier, self.base, self.allowed = multiplier, base, allowed
        self.hard, self.line, self.bare = hard, line, bare
        self.tokens: list[int] = []
        self.starts: list[int] = []  # per position, where its line starts
        self.where: dict[int, list[int]] = {}  # token -> its positions in the reply

    def push(self, token: int) -> None:
        p = len(self.tokens)
        self.starts.append(p if p == 0 or self.tokens[-1] in self.line else self.starts[-1])
        self.tokens.append(token)
        self.where.setdefault(token, []).append(p)

    def penalties(self) -> dict[int, float]:
        """token -> what it loses from its logit at the next step (only tokens that lose something)."""
        tokens, n = self.tokens, len(self.tokens)
        if n < 2 or tokens[-1] in self.hard:
            return {}
        longest: dict[int, int] = {}
        for i in self.where[tokens[-1]][:-1]:
            follower = tokens[i + 1]
            if follower in self.hard or follower in self.line:
                continue
            length = self._match(i, n - 1)
            if length >= self.allowed and length > longest.get(follower, -1):
                longest[follower] = length
        return {
            t: min(self.multiplier * self.base ** min(length - self.allowed, DRY_MAX_EXCESS), 1e30)
            for t, length in longest.items()
        }

    def _match(self, i: int, j: int) -> int:
        """How many tokens up to `i` repeat those up to `j` (i < j), by the rules of the class docstring."""
        tokens, limit = self.tokens, self.allowed + DRY_MAX_EXCESS
        k = 0
        while i - k >= 0 and k < limit:
            a = tokens[i - k]
            if a != tokens[j - k] or a in self.hard:
                break
            if a in self.line:
                width = self._same_line(i - k, j - k)
                if width is None:
                    break
                k += 1 + width
                continue
            k += 1
        return k

    def _same_line(self, a: int, b: int) -> int | None:
        """The width of the lines closed by the newlines at `a` < `b`, if they are the same tokens, else None."""
        sa, sb = self.starts[a], self.starts[b]
        if a - sa != b - sb:
            return None
        line = self.tokens[sa:a]
        if line != self.tokens[sb:b] or any(t in self.hard for t in line):
            return None
        if line and all(t in self.bare for t in line):  # punctuation alone is a frame; a blank line is crossed
            return None
        return a - sa


def penalise_loops(logits: Sequence[torch.Tensor], penalties: Sequence[dict[int, float]]) -> None:
    """Subtract each row's penalties (`LoopPenalty.penalties`) from every tensor of `logits`, in place, in one
    indexed write per tensor."""
    entries = [(i, token, value) for i, row in enumerate(penalties) for token, value in row.items()]
    if not entries:
        return
    rows, tokens, values = zip(*entries, strict=True)
    device = logits[0].device
    index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
    values = torch.tensor(values, dtype=torch.float32, device=device)
    for x in logits:
        x.index_put_(index, values.to(x.dtype).neg(), accumulate=True)
