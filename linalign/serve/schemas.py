"""Request bodies of the OpenAI-compatible endpoint, with linalign's own `linalign` object.

Every field that costs the server work per unit is bounded here, so a small body cannot buy a large bill:
the limits are named in the 400 a request over them gets.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _not_blank(text: str) -> str:
    # A blank principle would be dropped by the engine and change the plan's shape mid-batch.
    if not text.strip():
        raise ValueError("a principle must not be blank")
    return text


MAX_PRINCIPLES = 16
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_STRENGTH = 100.0
MAX_AMULET_ITERATIONS = 1000

Principle = Annotated[str, AfterValidator(_not_blank)]
Strength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message; text parts are joined and `developer` (OpenAI's newer name for system) is read as system."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class LinalignOptions(BaseModel):
    """How to align, sent by the official client as `extra_body={"linalign": {...}}`.

    Unset strengths fall back to the server's `--ratio` and `AlignConfig`'s defaults.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt knob must fail, not silently use a default

    method: Literal["base", "prompt", "la", "dera", "amulet"] = "la"
    principle: Principle | None = None
    principles: list[Principle] | None = Field(None, max_length=MAX_PRINCIPLES)
    weights: list[Strength] | None = Field(None, max_length=MAX_PRINCIPLES)
    ratio: Strength | None = None
    lam: Strength | None = None
    plausibility_top_p: float | None = None
    amulet_iterations: int | None = Field(None, ge=0, le=MAX_AMULET_ITERATIONS)
    amulet_eta: float | None = None
    amulet_alpha: float | None = None
    amulet_lambda: float | None = None
    # Linear Alignment's quality options (docs/quality.md); AlignConfig checks them.
    kl_budget: float | None = None
    repeat_guard: int | None = Field(None, ge=0, le=16)
    mask: Literal["top_p", "min_p", "intersect"] | None = None
    plausibility_min_p: float | None = None
    # The soft loop penalty (DRY; any method); AlignConfig checks the values.
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_breakers: list[Annotated[str, Field(min_length=1, max_length=16)]] | None = Field(None, max_length=16)

    @model_validator(mode="after")
    def _one_way_to_give_principles(self) -> LinalignOptions:
        if self.principle is not None and self.principles is not None:
            raise ValueError("give either principle or principles, not both")
        return self

    def principle_list(self) -> list[str]:
        return [self.principle] if self.principle is not None else list(self.principles or [])


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request that local decoding can honour; other fields are ignored."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=MAX_STRENGTH)
    top_p: float | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # Accepted by the schema only to be refused with a clear message rather than silently ignored.
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    linalign: LinalignOptions | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        for name in ("tools", "tool_choice", "response_format"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self
