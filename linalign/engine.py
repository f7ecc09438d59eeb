"""The public Python API: `Aligner` turns prompts, a method and decoding settings into text.

aligner = Aligner()                       # the built-in SmolLM2-135M-Instruct
out = aligner.generate(["Name three fruits."],
                       AlignConfig(method="la", principles=["Answer in lowercase."], ratio=2.0))
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

from linalign.compute import on_compute_thread
from linalign.config import AlignConfig, DecodeConfig, row_seed
from linalign.decode import Decoder, Prepared, kv_cells
from linalign.errors import LinalignError
from linalign.generation import Generation, Prompt
from linalign.methods import make_plan
from linalign.models import LoadedModel, load_model
from linalign.prompts import build_ids, to_conversation


def check_same_vocabulary(a: LoadedModel, b: LoadedModel) -> None:
    """DeRa mixes logits token by token, so both models must index the same vocabulary."""
    if a.vocab_size != b.vocab_size:
        raise LinalignError(
            f"vocabulary mismatch: {a.name} has {a.vocab_size} output tokens, {b.name} has {b.vocab_size}"
        )
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise LinalignError(f"vocabulary mismatch: {a.name} and {b.name} map tokens to different ids")


def _capacity(prepared: Sequence[Prepared]) -> dict[int, int]:
    """KV cells per model for decoding `prepared` to the end."""
    cells: dict[int, int] = {}
    for p in prepared:
        for model, n in kv_cells(p).items():
            cells[model] = cells.get(model, 0) + n
    return cells


class Aligner:
    """A model (and optionally DeRa's reference model) ready to decode with any method.

    Thread-safe: every call decodes in its own batch and cache over the shared weights, on linalign's compute
    thread (`linalign.compute`) whichever thread calls.
    """

    def __init__(
        self,
        model: LoadedModel | str | None = None,
        reference: LoadedModel | str | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        compile: bool = False,
        backend: str = "auto",
    ) -> None:
        def load(spec: LoadedModel | str | None) -> LoadedModel:
            if isinstance(spec, LoadedModel):
                return spec
            return load_model(spec, dtype=dtype, device=device, backend=backend)

        self.main = load(model)
        self.reference = None
        if reference is not None:
            self.reference = load(reference)
            check_same_vocabulary(self.main, self.reference)
        self.compile = compile  # static caches and a compiled step (linalign.backends.compiled)
        if compile:  # a model the compiled path cannot handle is refused now, not mid-generation
            for loaded in (self.main, self.reference):
                if loaded is not None:
                    loaded.open(compile=True)

    @property
    def tokenizer(self):
        return self.main.tokenizer

    def prepare(
        self,
        prompt: Prompt,
        align: AlignConfig,
        config: DecodeConfig,
        *,
        system: str | None = None,
        raw: bool = False,
        seed: int | None = None,
    ) -> Prepared:
        """Validate one sequence and tokenise each of its contexts, before any model work.

        The result can be decoded by `decode` or added to a running `Decoder` (as the server does).
        """
        conversation = to_conversation(prompt)
        if align.principles is None:
            raise LinalignError("this configuration takes its principles with each prompt (principles=...)")
        plan = make_plan(align)
        if align.method == "dera" and self.reference is None:  # at any lam, so that a sweep's runs agree
            raise LinalignError(
                "method 'dera' needs a reference model: Aligner(reference=...); on the command line and the server, "
                "it needs --ref-model",
                param="method",
            )
        loaded = (self.main, self.reference)
        term_ids = [
            build_ids(loaded[t.model].tokenizer, conversation, t.principle, system, raw, plan.principle_placement)
            for t in plan.terms
        ]
        prepared = Prepared(plan, term_ids, config, seed=seed if seed is not None else config.seed)
        fit = self.room(prepared)
        if fit is not None and config.max_new_tokens > fit[0]:
            left, limit = fit
            raise LinalignError(
                f"the prompt is {limit - left} tokens; with max_new_tokens={config.max_new_tokens} it exceeds "
                f"the model's context of {limit} tokens"
            )
        return prepared

    def room(self, prepared: Prepared) -> tuple[int, int] | None:
        """(tokens left to generate, the model's context length) in `prepared`'s tightest context; None where no
        model limits its context."""
        loaded = (self.main, self.reference)
        fits = [
            (limit - len(ids), limit)
            for t, ids in zip(prepared.plan.terms, prepared.term_ids, strict=True)
            if (limit := loaded[t.model].context_length) is not None
        ]
        return min(fits, default=None)

    def prepare_batch(
        self,
        prompts: Sequence[Prompt],
        align: AlignConfig | None = None,
        config: DecodeConfig | None = None,
        *,
        system: str | None = None,
        raw: bool = False,
        principles: Sequence[Sequence[str]] | None = None,
        seeds: Sequence[int | None] | None = None,
    ) -> list[Prepared]:
        """`prepare` for every prompt; `principles[i]` replaces `align.principles` for prompt `i`, and prompt
        `i` samples with seed `config.seed + i`, so its sample does not depend on its companions (or with
        `seeds[i]`, given)."""
        if isinstance(prompts, str) or not prompts:
            raise LinalignError("prompts must be a non-empty list of prompts")
        for name, per_prompt in (("principles", principles), ("seeds", seeds)):
            if per_prompt is not None and len(per_prompt) != len(prompts):
                raise LinalignError(f"got {name} for {len(per_prompt)} prompts, but {len(prompts)} prompts")
        align = align or AlignConfig(method="base")
        config = config or DecodeConfig()
        aligns = [align if principles is None else replace(align, principles=list(p)) for p in principles or prompts]
        return [
            self.prepare(p, a, config, system=system, raw=raw, seed=seeds[i] if seeds else row_seed(config.seed, i))
            for i, (p, a) in enumerate(zip(prompts, aligns, strict=True))
        ]

    def decoder(self, capacity: dict[int, int] | None = None, prefill_chunk: int | None = None) -> Decoder:
        """An empty decode loop over fresh caches of the model(s); `capacity[m]`: KV cells model `m` will need;
        `prefill_chunk`: prompt tokens prefilled per step (none: newcomers' prompts in one go)."""
        capacity = capacity or {}
        opened = {m: loaded for m, loaded in enumerate((self.main, self.reference)) if loaded is not None}
        backends = {m: loaded.open(capacity.get(m), compile=self.compile) for m, loaded in opened.items()}
        return Decoder(backends, self.tokenizer, self.main.eos_ids, self.main.device, prefill_chunk)

    def decode(
        self, prepared: Sequence[Prepared], cancelled: Sequence[bool] | None = None
    ) -> Iterator[list[Generation]]:
        """Decode prepared sequences as one batch, yielding every step's deltas (their indices are `prepared`'s).

        Setting `cancelled[i] = True` between steps ends sequence `i` (finish reason "cancelled").
        """
        decoder = self.decoder(_capacity(prepared))
        decoder.add_many(list(enumerate(prepared)))
        while len(decoder):
            if cancelled is not None:
                for i, flag in enumerate(cancelled):
                    if flag:
                        decoder.cancel(i)
            yield decoder.step()

    def stream(
        self,
        prompts: Sequence[Prompt],
        align: AlignConfig | None = None,
        config: DecodeConfig | None = None,
        *,
        system: str | None = None,
        raw: bool = False,
        principles: Sequence[Sequence[str]] | None = None,
        cancelled: list[bool] | None = None,
    ) -> Iterator[list[Generation]]:
        """Decode `prompts` as one batch, yielding after every step each sequence's delta: its new text and token
        (`Generation.add` puts a sequence's deltas together into what `generate` returns)."""
        prepared = self.prepare_batch(prompts, align, config, system=system, raw=raw, principles=principles)
        yield from self.decode(prepared, cancelled)

    @on_compute_thread  # the whole call at once: one hand-over instead of one a step
    def generate(
        self,
        prompts: Sequence[Prompt],
        align: AlignConfig | None = None,
        config: DecodeConfig | None = None,
        *,
        system: str | None = None,
        raw: bool = False,
        principles: Sequence[Sequence[str]] | None = None,
        seeds: Sequence[int | None] | None = None,
    ) -> list[Generation]:
        """Decode `prompts` as one batch and return one `Generation` per prompt (`prepare_batch`'s arguments)."""
        align = align or AlignConfig(method="base")
        prepared = self.prepare_batch(
            prompts, align, config, system=system, raw=raw, principles=principles, seeds=seeds
        )
        outputs = [
            Generation(i, prompt_tokens=p.prompt_tokens, prompt=prompt, method=align.method, strength=align.strength)
            for i, (prompt, p) in enumerate(zip(prompts, prepared, strict=True))
        ]
        start = time.perf_counter()
        for deltas in self.decode(prepared):
            for d in deltas:
                outputs[d.index].add(d)
        seconds = time.perf_counter() - start
        for g in outputs:
            g.seconds = seconds
        return outputs
