"""Linear Alignment inside `transformers`' own `generate`, as a `LogitsProcessor`.

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from linalign import LinearAlignmentLogitsProcessor

    processor = LinearAlignmentLogitsProcessor(model, plain_ids, ratio=2.0)
    model.generate(principled_ids, logits_processor=[processor], do_sample=False)

`generate` decodes the principled context; the processor keeps the plain context in step with its own
KV cache. This is the integration path; `Aligner` is faster because it fuses both contexts into one
forward pass. One processor serves any number of `generate` calls on the same plain prompts (it starts
over whenever `generate` does); beam search and several returned sequences per prompt are refused. The quality
options of `AlignConfig` (`repeat_guard`, `kl_budget`, `mask`, `plausibility_min_p`) act as they do in `Aligner`;
the guard counts the n-grams of the reply, the tokens `generate` adds after the prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, PreTrainedModel

from linalign.backends.transformers import TransformersBackend
from linalign.config import AlignConfig, DecodeConfig
from linalign.errors import LinalignError
from linalign.methods import make_plan
from linalign.step import Chain, Row, Step, term_weights

GENERATES = "(the principled prompt: generate's input)"
# generate applies these to the principled logits before any user processor; the plain ones would miss them.
_PRE_PROCESSING = ("repetition_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty", "bad_words_ids")


class LinearAlignmentLogitsProcessor(LogitsProcessor):
    """`l_p + ratio (l_p - l_0)` with the plausibility nucleus of `l_p` (at `temperature`), inside `generate`;
    `options`: `AlignConfig`'s quality options (`repeat_guard=4`, `kl_budget=1`, `mask="min_p"`, ...)."""

    def __init__(
        self,
        model: PreTrainedModel,
        plain_ids: Sequence[Sequence[int]] | torch.Tensor,
        ratio: float = 2.0,
        plausibility_top_p: float = 0.8,
        temperature: float = 1.0,
        pad_token_id: int | None = None,
        **options: float | int | str,
    ) -> None:
        unknown = sorted(set(options) - {"repeat_guard", "kl_budget", "mask", "plausibility_min_p"})
        if unknown:
            raise LinalignError(f"unknown option(s) {', '.join(unknown)} of LinearAlignmentLogitsProcessor")
        # One principle, whose context is generate's own input: the plan needs no text of it. The paper's recipe
        # plus `options`: the loop penalty is not among the processor's stages.
        config = AlignConfig(
            method="la",
            principles=[GENERATES],
            ratio=ratio,
            plausibility_top_p=plausibility_top_p,
            preset="paper",
            **options,
        )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise LinalignError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not math.isfinite(temperature):
            raise LinalignError(f"temperature must be a finite number > 0, got {temperature!r}")
        defaults = model.generation_config
        for name in _PRE_PROCESSING:
            value = getattr(defaults, name, None)
            if value not in (None, 0, 1.0):
                raise LinalignError(
                    f"the model's generation_config sets {name}={value!r}, which generate would apply to the "
                    "principled logits only; unset it or use linalign's Aligner"
                )
        self.model = model
        self.plain = plain_ids.tolist() if isinstance(plain_ids, torch.Tensor) else [list(r) for r in plain_ids]
        self.plan = make_plan(config)
        self.temperature = float(temperature)
        self._chain = Chain()
        self._weights: list[torch.Tensor] = []
        self.pad_token_id = pad_token_id if pad_token_id is not None else (defaults.pad_token_id or 0)
        self._backend: TransformersBackend | None = None
        self._length = -1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.plain):
            raise LinalignError(
                f"generate decodes {input_ids.shape[0]} rows but the processor has {len(self.plain)} plain "
                "prompts; beam search and num_return_sequences > 1 are not supported"
            )
        if self._backend is None or input_ids.shape[1] != self._length + 1:  # a new generate call
            self._backend = TransformersBackend(self.model, self.pad_token_id)
            plain_logits = self._backend.add(self.plain)
            # generate applies its own processors, warpers and choice: the chain's stages before sampling's run
            # here, on rows whose decoding settings leave the others neutral
            self._chain = Chain(device=scores.device)
            self._chain.join([Row(self.plan, DecodeConfig(), temperature=self.temperature) for _ in self.plain])
            self._weights = term_weights(self.plan, len(self.plain), scores.device)
        else:
            plain_logits = self._backend.step(input_ids[:, -1])
            self._chain.accept(input_ids[:, -1].tolist())
        self._length = input_ids.shape[1]
        principled, plain = scores.float(), plain_logits.to(scores.device).float()
        # the plan's terms: the principled context, then the plain one (none at ratio 0)
        terms = [(logits, None, None, w) for logits, w in zip((principled, plain), self._weights, strict=False)]
        return self._chain.scores(Step(self._chain, terms, anchor=principled, plain=plain))
