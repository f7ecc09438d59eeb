"""Where the decode loop lives: every (model, context) term of every sequence, in lock-step.

All contexts that one model sees (e.g. with and without the principle, for every sequence of the
batch) form one left-padded batch with one KV cache, so each step is a single forward pass per model
over `contexts x batch` rows and nothing is recomputed. The chosen token is appended to every context
of its sequence; a sequence that finishes (EOS, a stop string, cancelled) leaves the batch and its cache,
and reports padding from then on.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from linalign.combine import apply_mask, plausibility_mask
from linalign.config import DecodeConfig
from linalign.kernels import TransposedLinears
from linalign.methods import Plan


class ContextBatch:
    """Rows of token ids decoded together by one model, with their KV cache."""

    def __init__(self, model: PreTrainedModel, rows: Sequence[Sequence[int]], pad_id: int) -> None:
        self.model = model
        device = model.device
        width = max(len(r) for r in rows)
        self.input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
        self.attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            self.input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            self.attention_mask[i, width - len(row) :] = 1
        self.cache = None
        # transformers 5 renamed the KV cache `past_key_values` -> `cache` (argument and output); older
        # releases know only the first name.
        self._cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.last_position = self.attention_mask.sum(-1) - 1
        self.linears = TransposedLinears(model)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        positions = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(self.input_ids, positions)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` (one per row) and return next-token logits."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(tokens), 1))], 1)
        self.last_position = self.last_position + 1
        with self.linears.active():  # a step has few rows: see linalign.kernels
            return self._forward(tokens[:, None], self.last_position[:, None])

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row but `rows` (indices) from the batch and its KV cache."""
        self.attention_mask = self.attention_mask[rows]
        self.last_position = self.last_position[rows]
        self.cache.batch_select_indices(rows)

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


def logits_processors(config: DecodeConfig, eos_ids: list[int], prompt_length: int) -> LogitsProcessorList:
    """The standard `transformers` processors, applied to the combined logits."""
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
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k > 0:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    return warpers


@dataclass
class Step:
    """One decoded position: the token per sequence (padding once finished) and who is done."""

    tokens: torch.Tensor
    finished: torch.Tensor


def decode(
    plan: Plan,
    models: Sequence[PreTrainedModel],
    term_ids: Sequence[Sequence[Sequence[int]]],
    config: DecodeConfig,
    eos_ids: list[int],
    pad_id: int,
    plausibility_top_p: float = 0.8,
    stop_criteria: StopStringCriteria | None = None,
    cancelled: Sequence[bool] | None = None,
) -> Iterator[Step]:
    """Yield one `Step` per generated position until every sequence is finished.

    `term_ids[k][b]` is the prompt of sequence `b` for term `k` of `plan`. `cancelled` may be changed by
    the caller between steps (e.g. a client went away): those sequences finish at the next step.
    """
    batch = len(term_ids[0])
    device = models[plan.terms[0].model].device
    # Rows of one model: each of its distinct contexts, for every sequence; terms share identical contexts.
    context_of_term: list[tuple[int, int]] = []  # (model, index of the context among that model's)
    rows: dict[int, list[Sequence[int]]] = {}
    for term, ids in zip(plan.terms, term_ids, strict=True):
        model_rows = rows.setdefault(term.model, [])
        for start in range(0, len(model_rows), batch):
            if [list(r) for r in model_rows[start : start + batch]] == [list(r) for r in ids]:
                context_of_term.append((term.model, start // batch))
                break
        else:
            context_of_term.append((term.model, len(model_rows) // batch))
            model_rows.extend(ids)
    contexts = {m: ContextBatch(models[m], r, pad_id) for m, r in rows.items()}
    n_contexts = {m: len(r) // batch for m, r in rows.items()}

    # Processors see the first term's context, as `generate` would on that prompt.
    first_model, first_context = context_of_term[0]
    history = contexts[first_model].input_ids[first_context * batch : (first_context + 1) * batch]
    processors = logits_processors(config, eos_ids, history.shape[1])
    warpers = sampling_warpers(config) if config.do_sample else LogitsProcessorList()
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    eos = torch.tensor(eos_ids, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # Sequences still decoding, by their index in the batch: finished ones leave the forward pass.
    active = torch.arange(batch, device=device)

    logits_by_model = {m: c.prefill() for m, c in contexts.items()}
    for _ in range(config.max_new_tokens):
        width = len(active)
        term_logits = [logits_by_model[m][c * width : (c + 1) * width].to(device) for m, c in context_of_term]
        scores = processors(history, plan.combine(term_logits))
        if plan.anchor is not None:
            # Constraints such as min_new_tokens bind the mask's distribution and the fallback too.
            anchor = processors(history, term_logits[plan.anchor].clone())
            mask = plausibility_mask(anchor, plausibility_top_p, config.temperature)
            scores = apply_mask(scores, mask, fallback=anchor)
        chosen = _choose(warpers(history, scores), config.do_sample, generator)
        history = torch.cat([history, chosen[:, None]], dim=1)
        done = torch.isin(chosen, eos)
        if stop_criteria is not None:
            done = done | stop_criteria(history, scores).to(device)
        if cancelled is not None:
            done = done | torch.tensor(list(cancelled), dtype=torch.bool, device=device)[active]
        tokens = torch.full((batch,), pad_id, dtype=torch.long, device=device).index_copy(0, active, chosen)
        finished = finished.index_copy(0, active, done)
        yield Step(tokens=tokens, finished=finished.clone())
        if finished.all():
            return
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            active, history, chosen = active[keep], history[keep], chosen[keep]
            for m, c in contexts.items():
                c.keep(torch.cat([keep + i * width for i in range(n_contexts[m])]).to(c.model.device))
        logits_by_model = {m: c.step(chosen.repeat(n_contexts[m]).to(c.model.device)) for m, c in contexts.items()}


def _choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
