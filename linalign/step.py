"""The step on next-token logits as a sampler chain: an ordered list of small stages over a batch of rows.

Each row is one sequence (`Row`: its plan, its decoding settings, the tokens of its anchor context). A step
runs the stages in the order of `STAGES`, as llama.cpp's sampler chain and vLLM's fixed sampling order do:

    combine -> EOS hold -> penalties -> loop penalty and guard -> plausibility mask -> trust region
            -> temperature -> top-k -> top-p -> choose

Every stage works on the whole batch at once, with the rows' settings as `[rows, 1]` tensors built once
whenever the batch changes (`Chain.column`), and leaves the rows its settings make neutral as they are. A
stage that keeps a record of the tokens (the n-grams of the repeat guard, the repeats of the loop penalty)
sets it up in `start` and extends it in `accept`, the one hook every chosen token passes through.

The decode loop, the `transformers` logits processor and the benchmark's two-pass reference all run this
chain, so the method is written once; a new option is one stage here. A stage is a subclass of `Stage` put
in its place in `STAGES`; every chain built afterwards runs it:

    class NoDigits(Stage):  # s_t = -inf for the tokens in DIGITS, after the mask: no digit is chosen
        def apply(self, step: Step) -> None:
            step.scores[:, DIGITS] = float("-inf")

    STAGES.insert(STAGES.index(Temperature), NoDigits)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from linalign.combine import apply_mask, intersect_mask, min_p_mask, plausibility_mask, trust_region
from linalign.config import DecodeConfig
from linalign.methods import Plan
from linalign.text import vocabulary_texts

# One weighted term of the combination: the `[n, vocab]` logits of one model's rows, which of them to take
# (None: all, in order), the row of the batch each is added to (None: the same) and the `[k, 1]` weights.
Term = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]


@dataclass(eq=False)
class Row:
    """One sequence as the chain sees it. `prompt` is the anchor context's prompt (the history that the
    penalties read with the reply); `temperature`, where given, is the mask's (default: the config's)."""

    plan: Plan
    config: DecodeConfig
    prompt: Sequence[int] = ()
    generator: torch.Generator | None = None
    temperature: float | None = None
    reply: list[int] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # each stage's record of the tokens, by stage name

    @property
    def mask_temperature(self) -> float:
        return self.config.mask_temperature if self.temperature is None else self.temperature


@dataclass(eq=False)
class Step:
    """The `[rows, vocab]` float32 tensors of one step that the stages read and rewrite: the scores being
    shaped, the anchor context's logits (the mask's distribution and fallback), the plain context's where a
    mask needs it, the mask once taken, the scores before sampling's stages (`aligned`) and the tokens."""

    chain: Chain
    terms: Sequence[Term]
    anchor: torch.Tensor
    plain: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    aligned: torch.Tensor | None = None
    chosen: torch.Tensor | None = None

    @property
    def rows(self) -> list[Row]:
        return self.chain.rows


class Stage:
    """One stage of the chain. `apply` rewrites the step for every row at once; `start` sets up a row's record
    of the tokens as it joins, `accept` extends it with each token the row chose. Stages with `samples` set
    (temperature onwards) shape the draw alone: they replace `step.scores` and never write into it, so the
    scores before them stay readable (`Step.aligned`, for log-probabilities)."""

    samples = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def start(self, row: Row, chain: Chain) -> None:
        """Row `row` joins the batch."""

    def apply(self, step: Step) -> None:
        raise NotImplementedError

    def accept(self, row: Row, token: int) -> None:
        """Row `row` chose `token`."""


class Chain:
    """The stages (default: one of each class in `STAGES`, in order) over the rows decoding together."""

    def __init__(
        self,
        stages: Iterable[Stage] | None = None,
        *,
        eos_ids: Sequence[int] = (),
        tokenizer: Any = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.stages = [stage() for stage in STAGES] if stages is None else list(stages)
        self._accepting = [s for s in self.stages if type(s).accept is not Stage.accept]  # only those keep records
        self.device = torch.device(device)
        self.eos = torch.tensor(list(eos_ids), dtype=torch.long, device=self.device)
        self.tokenizer = tokenizer  # DRY's breakers are read from the tokens' text
        self.rows: list[Row] = []
        self._cache: dict[str, Any] = {}  # per-row settings as host lists and tensors, until the rows change

    def join(self, rows: Sequence[Row]) -> None:
        for row in rows:
            for stage in self.stages:
                stage.start(row, self)
        self.rows = [*self.rows, *rows]
        self._cache.clear()

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the rows at `indices`, in that order."""
        self.rows = [self.rows[i] for i in indices]
        self._cache.clear()

    def accept(self, tokens: Sequence[int]) -> None:
        for row, token in zip(self.rows, tokens, strict=True):
            row.reply.append(token)
            for stage in self._accepting:
                stage.accept(row, token)

    def scores(self, step: Step) -> torch.Tensor:
        """Run the stages before sampling's: the aligned scores (also kept as `step.aligned`)."""
        for stage in self.stages:
            if not stage.samples:
                stage.apply(step)
        step.aligned = step.scores
        return step.scores

    def choose(self, step: Step) -> torch.Tensor:
        """Run sampling's stages on the aligned scores: one token per row."""
        for stage in self.stages:
            if stage.samples:
                stage.apply(step)
        return step.chosen

    def values(self, name: str, value: Callable[[Row], Any]) -> list:
        """`value(row)` for every row, computed once until the rows change (`name` keys the cache)."""
        key = "values:" + name
        if key not in self._cache:
            self._cache[key] = [value(row) for row in self.rows]
        return self._cache[key]

    def where(self, name: str, test: Callable[[Row], bool]) -> list[int]:
        """The indices of the rows that pass `test`, decided on the host once until the rows change."""
        key = "where:" + name
        if key not in self._cache:
            self._cache[key] = [i for i, row in enumerate(self.rows) if test(row)]
        return self._cache[key]

    def column(self, name: str, value: Callable[[Row], float]) -> torch.Tensor:
        """`value(row)` of every row as a `[rows, 1]` float32 tensor on the device, built once until the rows
        change: the stages' per-row settings."""
        key = "column:" + name
        if key not in self._cache:
            values = [float(value(row)) for row in self.rows]
            self._cache[key] = torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]
        return self._cache[key]

    def index(self, rows: Sequence[int]) -> torch.Tensor | slice:
        """Rows `rows` of the batch as an index: every row (a slice, no copies) or a tensor of indices."""
        if len(rows) == len(self.rows):
            return slice(None)
        return torch.tensor(rows, dtype=torch.long, device=self.device)


# -- the stages, in their order ---------------------------------------------------------------------------------


class Combine(Stage):
    """`s = sum_k w_k l_k` in float32 over each row's weighted (model, context) terms (`Step.terms`).

    Example: Linear Alignment at `r = 2` weighs the principled and plain contexts `(1 + r, -r) = (3, -2)`, so
    `l_p = [2, 0]` and `l_0 = [1, 0]` give `s = [4, 0] = l_p + 2 (l_p - l_0)`.
    """

    def apply(self, step: Step) -> None:
        scores = torch.zeros((len(step.rows), step.anchor.shape[-1]), dtype=torch.float32, device=step.anchor.device)
        for logits, rows, seqs, weights in step.terms:
            # index_select and an in-place product: advanced indexing and a new tensor cost 3x as much here
            part = logits.index_select(0, rows).float().mul_(weights) if rows is not None else logits.float() * weights
            if seqs is None:
                scores.add_(part)
            else:
                scores.index_add_(0, seqs, part)
        step.scores = scores


class HoldEos(Stage):
    """`s_eos = -inf` (in the scores and the anchor's logits) while a row has fewer than `min_new_tokens` new
    tokens, as `transformers`' `MinNewTokensLengthLogitsProcessor` does.

    Example: with `min_new_tokens = 2` no end-of-sequence token can be the first or the second new token.
    """

    def apply(self, step: Step) -> None:
        holding = step.chain.where("min_new_tokens", lambda r: r.config.min_new_tokens > 0)
        early = [i for i in holding if len(step.rows[i].reply) < step.rows[i].config.min_new_tokens]
        if not early or not len(step.chain.eos):
            return
        rows = step.chain.index(early)
        rows = rows if isinstance(rows, slice) else rows[:, None]
        for x in (step.scores, step.anchor):
            x[rows, step.chain.eos] = float("-inf")


class RepetitionPenalty(Stage):
    """CTRL's repetition penalty (Keskar et al. 2019) as `transformers` applies it: the logit `x` of every token
    of the row's history (the anchor's prompt and the reply) becomes `x * p` where `x < 0`, else `x / p`
    (`p = repetition_penalty`), in the scores and the anchor's logits.

    Example: `p = 2` turns the logits `[4, -1, 3]` into `[2, -2, 3]` when tokens 0 and 1 were seen.
    """

    def start(self, row: Row, chain: Chain) -> None:
        if row.config.repetition_penalty != 1.0:
            row.state[self.name] = {*row.prompt, *row.reply}

    def accept(self, row: Row, token: int) -> None:
        seen = row.state.get(self.name)
        if seen is not None:
            seen.add(token)

    def apply(self, step: Step) -> None:
        rows = step.chain.where(self.name, lambda r: r.config.repetition_penalty != 1.0)
        if not rows:
            return
        pairs = [(i, t) for i in rows for t in step.rows[i].state[self.name]]
        index, tokens = (torch.tensor(x, device=step.chain.device) for x in zip(*pairs, strict=True))
        penalty = step.chain.column(self.name, lambda r: r.config.repetition_penalty)[index, 0]
        for x in (step.scores, step.anchor):
            value = x[index, tokens]
            x[index, tokens] = torch.where(value < 0, value * penalty, value / penalty)


class NGrams:
    """The n-grams a token sequence holds, kept as it grows, so the tokens that would repeat one are known in
    O(1) per step: `(n-1)`-gram -> the tokens that followed it."""

    def __init__(self, n: int, tokens: Iterable[int] = ()) -> None:
        self.n, self.tokens = n, []
        self.seen: dict[tuple[int, ...], set[int]] = {}
        for token in tokens:
            self.push(token)

    def push(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            self.seen.setdefault(tuple(self.tokens[-self.n : -1]), set()).add(token)

    def banned(self) -> set[int]:
        """Tokens that would complete an n-gram the sequence already contains."""
        if len(self.tokens) < self.n - 1:
            return set()
        return self.seen.get(tuple(self.tokens[len(self.tokens) - self.n + 1 :]), set())


class _NGramStage(Stage):
    """A ban of the tokens that would repeat an n-gram of a row's `history` (as it joins, then every token)."""

    def size(self, row: Row) -> int:
        raise NotImplementedError

    def history(self, row: Row) -> Sequence[int]:
        raise NotImplementedError

    def start(self, row: Row, chain: Chain) -> None:
        if self.size(row):
            row.state[self.name] = NGrams(self.size(row), self.history(row))

    def accept(self, row: Row, token: int) -> None:
        grams = row.state.get(self.name)
        if grams is not None:
            grams.push(token)

    def banned(self, step: Step) -> list[set[int]] | None:
        """Each row's banned tokens (None: no row bans any)."""
        if not step.chain.where(self.name, lambda r: self.size(r) > 0):
            return None
        banned = [r.state[self.name].banned() if self.name in r.state else set() for r in step.rows]
        return banned if any(banned) else None


class NoRepeatNGram(_NGramStage):
    """`x_t = -inf` (in the scores and the anchor's logits) for every token `t` that would complete an n-gram
    (`n = no_repeat_ngram_size`) that the row's history, prompt and reply, already holds, as `transformers`'
    `NoRepeatNGramLogitsProcessor` does.

    Example: `n = 2` after the tokens `[5, 7, 5]`: 7 is banned, since `5 7` would repeat.
    """

    def size(self, row: Row) -> int:
        return row.config.no_repeat_ngram_size

    def history(self, row: Row) -> Sequence[int]:
        return [*row.prompt, *row.reply]

    def apply(self, step: Step) -> None:
        banned = self.banned(step)
        if banned is not None:
            for x in (step.scores, step.anchor):
                _forbid(x, banned)


class Dry(Stage):
    """DRY, the soft loop penalty (`LoopPenalty`): a token `t` that would extend a repeat of an earlier span
    of the reply of length `L >= allowed` loses `multiplier * base ** (L - allowed)` from the scores and from
    the anchor's logits, once, before the mask is taken (as DRY precedes top-p).

    Example: multiplier 0.8, base 1.75, allowed 2: after the reply `[1, 2, 3, 1, 2]`, token 3 loses 0.8.
    """

    def start(self, row: Row, chain: Chain) -> None:
        plan = row.plan
        if plan.dry_multiplier:
            breakers = breaker_tokens(chain.tokenizer, plan.dry_breakers)
            loops = LoopPenalty(plan.dry_multiplier, plan.dry_base, plan.dry_allowed_length, *breakers)
            for token in row.reply:
                loops.push(token)
            row.state[self.name] = loops

    def accept(self, row: Row, token: int) -> None:
        loops = row.state.get(self.name)
        if loops is not None:
            loops.push(token)

    def apply(self, step: Step) -> None:
        if step.chain.where(self.name, lambda r: r.plan.dry_multiplier > 0):
            penalties = [r.state[self.name].penalties() if self.name in r.state else {} for r in step.rows]
            penalise_loops((step.scores, step.anchor), penalties)


class RepeatGuard(_NGramStage):
    """`x_t = -inf` in the scores, the anchor's and the plain context's logits for every token `t` that would
    complete an n-gram (`n = repeat_guard`) that the reply (not the prompt) already holds, so that greedy
    decoding cannot loop. The anchor's logits are replaced, not written into: log-probabilities report the
    principled distribution the guard has not touched.

    Example: `n = 3` after the reply `[4, 8, 9, 4, 8]`: 9 is banned, since `4 8 9` would repeat.
    """

    def size(self, row: Row) -> int:
        return row.plan.repeat_guard

    def history(self, row: Row) -> Sequence[int]:
        return row.reply

    def apply(self, step: Step) -> None:
        banned = self.banned(step)
        if banned is None:
            return
        step.scores, step.anchor = _forbid(step.scores.clone(), banned), _forbid(step.anchor.clone(), banned)
        if step.plain is not None:
            step.plain = _forbid(step.plain.clone(), banned)


class PlausibilityMask(Stage):
    """Tokens outside the row's plausibility mask leave the scores (`-inf`); a row left with no finite score
    falls back to the anchor's logits under the mask. The mask is taken from `softmax(anchor / T)` (`T`: the
    sampling temperature, 1 when greedy) by the plan's kind:

    - `top_p` (the paper): the nucleus at `p`, a token kept while the mass before it is below `p`;
    - `min_p`: the tokens with a probability of at least `min_p` times the top token's;
    - `intersect`: the `top_p` nucleus within the plain distribution's, the anchor's top token always kept.

    Example: `softmax(anchor) = [0.5, 0.3, 0.2]` at `p = 0.8`: the masses before the tokens are
    `[0, 0.5, 0.8]`, so the first two stay.
    """

    def apply(self, step: Step) -> None:
        chain = step.chain
        kinds = chain.values("mask_kind", lambda r: r.plan.mask_kind if r.plan.mask_top_p else None)
        groups = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in set(kinds) - {None}}
        if not groups:
            return
        if len(groups) == 1 and None not in kinds:  # one kind for the whole batch, the usual case: no row copies
            mask = self._mask(step, kinds[0], slice(None))
        else:
            mask = torch.ones_like(step.anchor, dtype=torch.bool)
            for kind, rows in groups.items():
                index = chain.index(rows)
                mask[index] = self._mask(step, kind, index)
        step.mask = mask
        step.scores = apply_mask(step.scores, mask, fallback=step.anchor)

    @staticmethod
    def _mask(step: Step, kind: str, rows: torch.Tensor | slice) -> torch.Tensor:
        temperature = step.chain.column("mask_temperature", lambda r: r.mask_temperature)[rows]
        if kind == "min_p":
            min_p = step.chain.column("mask_min_p", lambda r: r.plan.mask_min_p)[rows]
            return min_p_mask(step.anchor[rows], min_p, temperature)
        top_p = step.chain.column("mask_top_p", lambda r: r.plan.mask_top_p or 0.0)[rows]
        if kind == "intersect":
            return intersect_mask(step.anchor[rows], step.plain[rows], top_p, temperature)
        return plausibility_mask(step.anchor[rows], top_p, temperature)


class TrustRegion(Stage):
    """On the mask's tokens, `s <- a + f (s - a)` with `a` the anchor's logits and `f` the largest of 0, 1/64,
    ..., 1 whose distribution, and every grid point's before it, stays within `kl_budget` nats of the
    anchor's: `KL(softmax(x / T) || softmax(a / T)) <= kl_budget` (`linalign.combine.trust_region`).

    Example: a budget of 0 gives `a`, the principled distribution (plain prompting); a budget larger than the
    full contrast's KL leaves `s`, Linear Alignment's scores, as they are.
    """

    def apply(self, step: Step) -> None:
        chain = step.chain
        rows = chain.where(self.name, lambda r: r.plan.kl_budget is not None)
        if not rows:
            return
        mask = step.mask if step.mask is not None else torch.ones_like(step.anchor, dtype=torch.bool)
        index = chain.index(rows)
        budget = chain.column(self.name, lambda r: r.plan.kl_budget or 0.0)[index]
        temperature = chain.column("mask_temperature", lambda r: r.mask_temperature)[index]
        trusted = trust_region(step.scores[index], step.anchor[index], mask[index], budget, temperature)
        if isinstance(index, slice):
            step.scores = trusted
        else:
            step.scores[index] = trusted


class Temperature(Stage):
    """`s <- s / T` on the sampled rows (`T = temperature`); greedy rows are left as they are.

    Example: `T = 0.5` turns `[2, 1]` into `[4, 2]`, a sharper draw.
    """

    samples = True

    def apply(self, step: Step) -> None:
        if step.chain.where(self.name, _warmed):
            step.scores = step.scores / step.chain.column(
                self.name, lambda r: r.config.temperature if _warmed(r) else 1
            )


class TopK(Stage):
    """Sampled rows keep their `k = top_k` highest scores (0: all): `s_t <- -inf` where `s_t` is below the
    k-th highest, as `transformers`' `TopKLogitsWarper` does (ties at the k-th score stay).

    Example: `k = 2` turns `[3, 1, 2]` into `[3, -inf, 2]`.
    """

    samples = True

    def apply(self, step: Step) -> None:
        rows = step.chain.where(self.name, lambda r: r.config.do_sample and r.config.top_k > 0)
        if not rows:
            return
        vocab = step.scores.shape[-1]
        k = [min(max(step.rows[i].config.top_k, 1), vocab) for i in rows]
        index = step.chain.index(rows)
        scores = step.scores[index]
        kth = scores.topk(max(k), dim=-1).values.gather(-1, torch.tensor(k, device=scores.device)[:, None] - 1)
        _replace(step, index, scores.masked_fill(scores < kth, float("-inf")))


class TopP(Stage):
    """Nucleus sampling (Holtzman et al. 2020) on the sampled rows, as `transformers`' `TopPLogitsWarper`
    does: in ascending order of `softmax(s)`, the tokens whose cumulative probability is at most `1 - top_p`
    leave (`-inf`); the top token always stays.

    Example: `softmax(s) = [0.1, 0.3, 0.6]` at `top_p = 0.8`: the cumulative masses are `[0.1, 0.4, 1.0]`,
    so only the first token (0.1 <= 0.2) leaves.
    """

    samples = True

    def apply(self, step: Step) -> None:
        rows = step.chain.where(self.name, lambda r: r.config.do_sample and r.config.top_p < 1.0)
        if not rows:
            return
        index = step.chain.index(rows)
        scores = step.scores[index]
        # 1 - top_p in double precision, then float32, as the warper compares
        floor = step.chain.column(self.name, lambda r: 1 - r.config.top_p)[index]
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= floor
        drop[..., -1:] = False
        _replace(step, index, scores.masked_fill(drop.scatter(1, order, drop), float("-inf")))


class Choose(Stage):
    """The token of every row: the argmax of `s` for greedy rows, a draw from `softmax(s)` with the row's own
    generator for sampled ones (`choose`).

    Example: `s = [1, 3, 2]` gives token 1 when greedy.
    """

    samples = True

    def apply(self, step: Step) -> None:
        sample = step.chain.values("do_sample", lambda r: r.config.do_sample)
        step.chosen = choose(step.scores, sample, step.chain.values("generator", lambda r: r.generator))


STAGES: list[type[Stage]] = [
    Combine,
    HoldEos,
    RepetitionPenalty,
    NoRepeatNGram,
    Dry,
    RepeatGuard,
    PlausibilityMask,
    TrustRegion,
    Temperature,
    TopK,
    TopP,
    Choose,
]


def term_weights(plan: Plan, rows: int, device: torch.device | str) -> list[torch.Tensor]:
    """The weight of each of `plan`'s terms as a `[rows, 1]` column, for a batch whose rows all share `plan`
    and whose terms come as one `[rows, vocab]` tensor each (the logits processor, the benchmark's reference)."""
    return [torch.full((rows, 1), t.weight, dtype=torch.float32, device=device) for t in plan.terms]


def _warmed(row: Row) -> bool:
    return row.config.do_sample and row.config.temperature != 1.0


def _replace(step: Step, index: torch.Tensor | slice, rows: torch.Tensor) -> None:
    """`step.scores` with the rows at `index` replaced, as a new tensor (sampling's stages never write in place)."""
    if isinstance(index, slice):
        step.scores = rows
    else:
        step.scores = step.scores.index_put((index,), rows)


def _forbid(logits: torch.Tensor, banned: Sequence[set[int]]) -> torch.Tensor:
    """`logits` with each row's `banned` tokens at -inf, in place."""
    pairs = [(i, token) for i, tokens in enumerate(banned) for token in tokens]
    if pairs:
        rows, tokens = zip(*pairs, strict=True)
        logits[list(rows), list(tokens)] = float("-inf")
    return logits


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
    texts = vocabulary_texts(tokenizer)
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
