"""Where the decode loop lives: every (model, context) row of every sequence, in lock-step.

A sequence is a prepared request (`Prepared`: its plan of weighted terms, each term's prompt ids and its
own decoding settings). Its distinct contexts become rows of the backends (one per model), added after the
rows already there, so the row order is sequence by sequence, in the order sequences joined:

    rows of model m = [seq0 ctx0, seq0 ctx1, seq1 ctx0, seq1 ctx1, seq2 ctx0, ...]

A `Decoder` step (1) runs the sampler chain (`linalign.step`): it combines each sequence's rows into its
scores, shapes them and chooses its token, (2) turns tokens into text and finds who finished (EOS, a stop
string, its length, cancelled), (3) drops finished sequences' rows, and (4) runs one forward pass per model
for the rows left, so every sequence's next logits are ready. Sequences may join between steps (`add`); no
forward pass runs once nobody is left.

With `prefill_chunk`, joining sequences do not decode at once: each step also computes at most that many tokens
of their prompts (`_prefill_some`), and they decode from the step their prompts are complete. So no step waits for
more than one chunk of prefill, however long a newcomer's prompt, and a short prompt passes a long one (the budget
goes to the prompts with the fewest tokens left, except that the oldest goes first when it got nothing at the
step before, so none waits for ever).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from linalign.backends import Backend, Prefill
from linalign.compute import on_compute_thread
from linalign.config import DecodeConfig
from linalign.generation import Generation, TopLogprobs
from linalign.methods import Plan
from linalign.step import Chain, Row, Step
from linalign.text import TextStream


@dataclass
class Prepared:
    """One sequence ready to decode: `term_ids[k]` is the prompt of term `k` of `plan`, tokenised."""

    plan: Plan
    term_ids: list[list[int]]
    config: DecodeConfig
    seed: int | None = None  # this sequence's own sampling seed (the batch's seed plus its index)

    @property
    def prompt_tokens(self) -> int:
        return len(self.term_ids[self.plan.anchor])


@dataclass
class _Sequence:
    key: Hashable
    prepared: Prepared
    text: TextStream
    sampler: Row  # what the sampler chain reads and records of this sequence
    weights: dict[int, list[tuple[int, float]]]  # model -> (context index, weight) of every term on it
    anchor: tuple[int, int]  # (model, context index) of the anchor term
    plain: tuple[int, int] | None
    first: dict[int, int] = field(default_factory=dict)  # model -> row of this sequence's first context
    new_tokens: int = 0
    cancelled: bool = False
    done: bool = False  # finished, its rows kept only because a backend cannot drop rows

    @property
    def config(self) -> DecodeConfig:
        return self.prepared.config

    def row(self, where: tuple[int, int]) -> int:
        return self.first[where[0]] + where[1]


@dataclass
class _Coming:
    """Sequences added together whose prompts are being prefilled (per model, their contexts as rows to come)."""

    sequences: list[_Sequence]
    prefills: dict[int, Prefill]
    idle: bool = False  # no token of theirs was computed at the last step

    @property
    def left(self) -> int:
        return sum(p.left for p in self.prefills.values())

    def run(self, tokens: int) -> int:
        """Compute about `tokens` of the prompts (at least one); the tokens computed."""
        spent = 0
        for prefill in self.prefills.values():
            if prefill.left and spent < tokens:
                spent += prefill.run(tokens - spent)
        return spent


def _contexts(prepared: Prepared) -> tuple[dict[int, list[list[int]]], dict[int, list[tuple[int, float]]], list]:
    """Each model's distinct contexts of one sequence, the (context, weight) of every term on each model, and
    the (model, context) of every term: identical contexts of one model share a row."""
    contexts: dict[int, list[list[int]]] = {}
    weights: dict[int, list[tuple[int, float]]] = {}
    where = []
    for term, ids in zip(prepared.plan.terms, prepared.term_ids, strict=True):
        model_contexts = contexts.setdefault(term.model, [])
        if ids not in model_contexts:
            model_contexts.append(ids)
        where.append((term.model, model_contexts.index(ids)))
        weights.setdefault(term.model, []).append((where[-1][1], term.weight))
    return contexts, weights, where


def kv_cells(prepared: Prepared, new_tokens: int | None = None) -> dict[int, int]:
    """KV cells per model that `prepared` fills with `new_tokens` (default: its length limit) generated: each
    distinct context's prompt plus the new tokens."""
    new = prepared.config.max_new_tokens if new_tokens is None else new_tokens
    return {m: sum(len(c) for c in ids) + len(ids) * new for m, ids in _contexts(prepared)[0].items()}


class Decoder:
    """Sequences decoding together over one backend per model (see the module docstring)."""

    def __init__(
        self,
        backends: dict[int, Backend],
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: Sequence[int],
        device: torch.device | str = "cpu",
        prefill_chunk: int | None = None,
    ) -> None:
        self.backends, self.tokenizer = backends, tokenizer
        self.eos_ids = list(eos_ids)
        self.device = torch.device(device)
        self.chain = Chain(eos_ids=self.eos_ids, tokenizer=tokenizer, device=self.device)  # one row a sequence
        self.sequences: list[_Sequence] = []  # in row order
        self.rows: dict[int, int] = dict.fromkeys(backends, 0)  # rows held per model
        self.logits: dict[int, torch.Tensor] = {}  # per model: next-token logits of every row
        self._last: torch.Tensor | None = None  # tokens chosen at the last step, one per sequence
        # Prompt tokens prefilled per step, where every backend can prefill in chunks (see the module docstring).
        chunked = prefill_chunk is not None and all(b.chunked_prefill for b in backends.values())
        self.prefill_chunk = prefill_chunk if chunked else None
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.coming: list[_Coming] = []  # in the order they were added

    def __len__(self) -> int:
        """Sequences still decoding or to decode once prefilled."""
        return sum(not s.done for s in self.sequences) + sum(len(c.sequences) for c in self.coming)

    def fits(self, prepared: Sequence[Prepared], alone: bool = False) -> bool:
        """Whether every cache of fixed size can prefill `prepared` and take a first step now (`alone`: in an
        empty decoder). Sequences that later outgrow it end early (see `_make_room`)."""
        need = {m: 0 if alone else b.used + self.rows[m] for m, b in self.backends.items()}
        for p in prepared:
            for m, cells in kv_cells(p, new_tokens=1).items():
                need[m] += cells
        return all(need[m] <= b.kv_capacity for m, b in self.backends.items() if b.kv_capacity is not None)

    @property
    def can_add(self) -> bool:
        """Whether sequences can join now: always when idle; while others decode, if every cache can merge."""
        return not self.sequences or all(b.can_merge for b in self.backends.values())

    def add(self, key: Hashable, prepared: Prepared) -> None:
        """Prefill `prepared` and let it decode from the next step on."""
        self.add_many([(key, prepared)])

    @on_compute_thread
    def add_many(self, items: Sequence[tuple[Hashable, Prepared]]) -> None:
        """Sequences that decode from the next step on, their prompts prefilled together (a prefix they share is
        computed once) in one forward pass per model; with `prefill_chunk`, a chunk per step from the next on,
        after which they decode."""
        if not items:
            return
        if not self.can_add:
            raise RuntimeError("this model's cache cannot take new sequences while others decode")
        sequences, prompts = [], {m: [] for m in self.backends}
        for key, prepared in items:
            seq, contexts = self._sequence(key, prepared)
            for m, model_contexts in contexts.items():
                seq.first[m] = len(prompts[m])  # within these rows; after the rows already there once joined
                prompts[m].extend(model_contexts)
            sequences.append(seq)
        coming = _Coming(sequences, {m: self._prefill(m, rows) for m, rows in prompts.items() if rows})
        if self.prefill_chunk is not None:
            self.coming.append(coming)
            return
        self._advance()  # rows already decoding get their next logits first: new rows join after them
        coming.run(coming.left)
        self._join(coming)

    def _prefill(self, m: int, prompts: list[list[int]]) -> Prefill:
        return self.backends[m].prefill(prompts)

    def _sequence(self, key: Hashable, prepared: Prepared) -> tuple[_Sequence, dict[int, list[list[int]]]]:
        """A sequence's state, and its distinct contexts per model."""
        contexts, weights, where = _contexts(prepared)
        plain = prepared.plan.plain
        seq = _Sequence(
            key=key,
            prepared=prepared,
            text=TextStream(self.tokenizer, prepared.config.stop),
            sampler=Row(
                prepared.plan, prepared.config, prepared.term_ids[prepared.plan.anchor], self._generator(prepared)
            ),
            weights=weights,
            anchor=where[prepared.plan.anchor],
            plain=where[plain] if plain is not None else None,
        )
        return seq, contexts

    def _join(self, coming: _Coming) -> list[Generation]:
        """Prefilled sequences join the decoding ones, after them; those cancelled meanwhile end at once."""
        for s in coming.sequences:
            for m in s.first:
                s.first[m] += self.rows[m]
        for m, prefill in coming.prefills.items():
            new = prefill.join().to(self.device)
            self.logits[m] = torch.cat([self.logits[m], new]) if self.rows[m] else new
            self.rows[m] += len(new)
        self.sequences += coming.sequences
        self.chain.join([s.sampler for s in coming.sequences])
        self._reindex()
        return [self._end(s, "cancelled") for s in coming.sequences if s.cancelled]

    def _prefill_some(self) -> list[Generation]:
        """At most `prefill_chunk` prompt tokens of the sequences to come, the fewest left first, except that the
        oldest goes first when it got none at the last step; those complete join."""
        budget = self.prefill_chunk or 0
        order = sorted(self.coming, key=lambda c: c.left)
        if self.coming and self.coming[0].idle:
            order.insert(0, order.pop(order.index(self.coming[0])))
        for coming in order:
            spent = coming.run(budget) if budget > 0 else 0
            coming.idle, budget = not spent, budget - spent
        events = []
        for coming in [c for c in self.coming if not c.left]:
            self.coming.remove(coming)
            events += self._join(coming)
        return events

    def _cancel_coming(self) -> list[Generation]:
        """Sequences to come that are all cancelled are given up, their prefill unfinished."""
        events = []
        for coming in [c for c in self.coming if all(s.cancelled for s in c.sequences)]:
            self.coming.remove(coming)
            for prefill in coming.prefills.values():
                prefill.cancel()
            events += [self._end(s, "cancelled") for s in coming.sequences]
        return events

    def _end(self, s: _Sequence, reason: str) -> Generation:
        """`s` ends without a token; its last delta."""
        s.text.finish()
        s.done = True
        return Generation(s.key, s.text.delta(final=True), finish_reason=reason)

    def _generator(self, prepared: Prepared) -> torch.Generator | None:
        if not prepared.config.do_sample or prepared.seed is None:
            return None  # unseeded sampling draws from torch's global generator
        return torch.Generator(device=self.device).manual_seed(prepared.seed)

    def cancel(self, key: Hashable) -> None:
        """End sequence `key` at the next step (finish reason "cancelled"), before it chooses another token; one
        still to come is given up with its prefill once every sequence prefilled with it is cancelled."""
        for s in [*self.sequences, *(s for c in self.coming for s in c.sequences)]:
            if s.key == key and not s.done:
                s.cancelled = True

    @on_compute_thread
    def step(self) -> list[Generation]:
        """Choose one token for every sequence and report what happened, as one delta (`Generation`) per sequence;
        finished sequences leave. With `prefill_chunk`, a chunk of the prompts to come is computed first."""
        events = self._cancel_coming()
        events += [self._end(s, "cancelled") for s in self.sequences if s.cancelled and not s.done]
        self._drop_done()
        events += self._make_room()
        if not len(self):
            return events
        self._advance()
        if self.coming:
            events += self._prefill_some()
            self._drop_done()
        if not any(not s.done for s in self.sequences):
            return events
        chosen, logprobs = self._choose()
        for i, (s, token) in enumerate(zip(self.sequences, chosen.tolist(), strict=True)):
            if s.done:
                continue
            s.new_tokens += 1
            s.text.push(token)
            reason = self._finish_reason(s, token)
            if reason:
                s.text.finish()
                s.done = True
            text = s.text.delta(final=reason is not None)
            events.append(Generation(s.key, text, [token], reason, None if logprobs[i] is None else [logprobs[i]]))
        self._last = chosen
        self._drop_done()
        return events

    # -- the stages of a step --------------------------------------------------------------------------

    def _finish_reason(self, s: _Sequence, token: int) -> str | None:
        if token in self.eos_ids or s.text.stopped:
            return "stop"
        if s.new_tokens >= s.config.max_new_tokens:
            return "length"
        return None

    def _reindex(self) -> None:
        """Per model, the row, sequence and weight of every term: tensors for the vectorised combination."""
        self._terms: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for m in self.backends:
            entries = [(s.first[m] + c, i, w) for i, s in enumerate(self.sequences) for c, w in s.weights.get(m, [])]
            if entries:
                rows, seqs, weights = zip(*entries, strict=True)
                self._terms[m] = (
                    torch.tensor(rows, device=self.device),
                    torch.tensor(seqs, device=self.device),
                    torch.tensor(weights, dtype=torch.float32, device=self.device)[:, None],
                )

    def _context_logits(self, where: Sequence[tuple[int, int] | None]) -> torch.Tensor:
        """`[sequences, V]` logits of one context per sequence, given as (model, context index)."""
        vocab = next(iter(self.logits.values())).shape[-1]
        out = None
        for m in self.backends:
            picks = [
                (i, s.row(w)) for i, (s, w) in enumerate(zip(self.sequences, where, strict=True)) if w and w[0] == m
            ]
            if not picks:
                continue
            seqs, rows = zip(*picks, strict=True)
            chosen = self.logits[m].index_select(0, torch.tensor(rows, device=self.device)).float()
            if len(picks) == len(self.sequences):  # every sequence's context on this model: the rows themselves
                return chosen
            if out is None:
                out = torch.zeros((len(self.sequences), vocab), device=self.device)
            out.index_copy_(0, torch.tensor(seqs, device=self.device), chosen)
        return out if out is not None else torch.zeros((len(self.sequences), vocab), device=self.device)

    def _choose(self) -> tuple[torch.Tensor, list[TopLogprobs | None]]:
        """Run the sampler chain (`linalign.step`) over every sequence: its token and, where asked, logprobs."""
        anchor = self._context_logits([s.anchor for s in self.sequences])
        intersect = self.chain.where("intersect", lambda r: r.plan.mask_kind == "intersect" and bool(r.plan.mask_top_p))
        terms = [(self.logits[m], rows, seqs, weights) for m, (rows, seqs, weights) in self._terms.items()]
        plain = self._context_logits([s.plain for s in self.sequences]) if intersect else None
        step = Step(self.chain, terms, anchor, plain)
        aligned = self.chain.scores(step)
        chosen = self.chain.choose(step)
        self.chain.accept(chosen.tolist())
        if not any(s.config.logprobs is not None for s in self.sequences):
            return chosen, [None] * len(self.sequences)
        return chosen, self._logprobs(aligned, anchor, chosen)

    def _logprobs(self, aligned: torch.Tensor, anchor: torch.Tensor, chosen: torch.Tensor) -> list[TopLogprobs | None]:
        """The chosen token's log-probability and the top alternatives under the aligned, principled and plain
        distributions, for the sequences that ask."""
        aligned = torch.log_softmax(aligned, dim=-1)
        plain = self._context_logits([s.plain for s in self.sequences])
        out: list[TopLogprobs | None] = []
        for i, s in enumerate(self.sequences):
            k = s.config.logprobs
            if k is None:
                out.append(None)
                continue
            contrast = s.plain is not None
            out.append(
                TopLogprobs(
                    logprob=float(aligned[i, chosen[i]]),
                    aligned=_top(aligned[i], k),
                    principled=_top(anchor[i], k) if contrast else None,
                    plain=_top(plain[i], k) if contrast else None,
                )
            )
        return out

    def _make_room(self) -> list[Generation]:
        """Where a cache of fixed size cannot take one more token for every row, the newest sequences end
        ("length") and leave, so that the others decode on instead of the step failing for all."""
        events = []
        for m, backend in self.backends.items():
            capacity = backend.kv_capacity
            while capacity is not None and backend.can_drop and backend.used + self.rows[m] > capacity:
                live = [s for s in self.sequences if m in s.first and not s.done]
                if not live:
                    break
                events.append(self._end(live[-1], "length"))
                self._drop_done()
        return events

    def _drop_done(self) -> None:
        """Drop finished sequences' rows from every backend; where a backend cannot drop rows, they stay
        (decoding padding that nobody reads) until every sequence has finished."""
        if not any(s.done for s in self.sequences):
            return
        droppable = all(b.can_drop for b in self.backends.values())
        if droppable or not len(self):
            self._keep([i for i, s in enumerate(self.sequences) if not s.done])

    def _keep(self, indices: list[int]) -> None:
        """Keep only the sequences at `indices`, and their rows in every backend."""
        remaining = [self.sequences[i] for i in indices]
        for m, backend in self.backends.items():
            rows = [s.first[m] + c for s in remaining if m in s.first for c in range(self._contexts_on(s, m))]
            if len(rows) < self.rows[m]:
                backend.keep(torch.tensor(rows, dtype=torch.long))
                if m in self.logits:
                    self.logits[m] = self.logits[m][rows]
                self.rows[m] = len(rows)
            first = 0
            for s in remaining:
                if m in s.first:
                    s.first[m], first = first, first + self._contexts_on(s, m)
        if self._last is not None:
            self._last = self._last[indices]
        self.sequences = remaining
        self.chain.keep(indices)
        self._reindex()

    @staticmethod
    def _contexts_on(s: _Sequence, m: int) -> int:
        return 1 + max(c for c, _ in s.weights[m])

    def _advance(self) -> None:
        """Run the forward pass for the tokens chosen at the last step, once, before anything reads logits."""
        if self._last is None:
            return
        last, self._last = self._last, None
        for m, backend in self.backends.items():
            if self.rows[m]:
                owners = [
                    i for i, s in enumerate(self.sequences) if m in s.first for _ in range(self._contexts_on(s, m))
                ]
                tokens = last[torch.tensor(owners, dtype=torch.long, device=self.device)]
                self.logits[m] = backend.step(tokens).to(self.device)


def _top(logits: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if not k:
        return []
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k)
    return list(zip(ids.tolist(), values.tolist(), strict=True))
