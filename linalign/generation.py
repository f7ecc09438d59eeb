"""What decoding gives back: one type for a sequence's output, whole or one step of it.

`Aligner.generate` returns a `Generation` per prompt, whole. `Aligner.stream` and `Decoder.step` give one per
sequence and step holding only that step's new text and token (a *delta*); `Generation.add` appends a delta to
the whole, the one place a sequence's output is put together (by `generate`, and by the server for its replies
and its usage). The CLI's JSON, the batch jobs' and eval's records are its `to_dict`.

    whole = Generation(index=0)
    for deltas in aligner.stream(["Name a fruit."], align, config):
        for d in deltas:
            whole.add(d)                  # whole.text, whole.token_ids, whole.finish_reason as generate's
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from linalign.prompts import Conversation

Prompt = str | Conversation

# The CLI's JSON record, in this order, the strength flattened in after it.
RECORD = ("prompt", "method", "text", "new_tokens", "prompt_tokens", "seconds", "finish_reason")


@dataclass
class TopLogprobs:
    """The chosen token's log-probability under the aligned distribution and the top alternatives, with the
    top alternatives of the anchor (principled) and plain contexts where the plan has them."""

    logprob: float
    aligned: list[tuple[int, float]]
    principled: list[tuple[int, float]] | None = None
    plain: list[tuple[int, float]] | None = None


@dataclass
class Generation:
    """One sequence's output, whole or one step of it (see the module docstring)."""

    index: Hashable = 0  # which sequence: the prompt's position, a server request's copy, a decoder's key
    text: str = ""
    token_ids: list[int] = field(default_factory=list, repr=False)  # as chosen, EOS included
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length" or "cancelled"; None: not yet
    logprobs: list[TopLogprobs] | None = None  # one per token of `token_ids`, where asked (`DecodeConfig.logprobs`)
    prompt_tokens: int = 0
    # What `Aligner.generate` records of its call: the prompt, the method and its strength, the seconds it took.
    prompt: Prompt | None = None
    method: str | None = None
    strength: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def key(self) -> Hashable:
        """`index`, as the decode loop names its sequences."""
        return self.index

    @property
    def token(self) -> int | None:
        """The last token chosen: a delta's own token; None in a delta without one (ended before choosing)."""
        return self.token_ids[-1] if self.token_ids else None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    def add(self, delta: Generation) -> None:
        """Append `delta`, a later step of the same sequence."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason

    def to_dict(self, keys: Iterable[str] | None = None) -> dict:
        """A JSON record: the CLI's (`RECORD`, then the strength flattened in, no token ids), or just `keys`."""
        if keys is not None:
            return {k: getattr(self, k) for k in keys}
        return {k: getattr(self, k) for k in RECORD} | self.strength


def usage(copies: Sequence[Generation]) -> dict[str, int]:
    """OpenAI's `usage` of a request's copies: its prompt counted once, and every copy's new tokens."""
    prompt, completion = copies[0].prompt_tokens, sum(g.new_tokens for g in copies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# The name `Aligner.stream`'s deltas are exported under, which programs import.
TextDelta = Generation
