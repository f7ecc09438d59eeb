"""Request bodies of the OpenAI-compatible endpoint, with linalign's own `linalign` object.

Every field that costs the server work per unit is bounded here, so a small body cannot buy a large bill:
the limits are named in the 400 a request over them gets.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from linalign.config import MASKS, METHODS


def _encodable(text: str) -> str:
    """Text the tokenizer can take: JSON's `\\ud800` escapes can smuggle in a lone surrogate, which no UTF-8
    encoder accepts."""
    try:
        text.encode()
    except UnicodeEncodeError as err:
        raise PydanticCustomError(
            "unicode_surrogate",
            "must be valid Unicode text: it holds a lone surrogate ({char}) at character {at}",
            {"char": f"\\u{ord(text[err.start]):04x}", "at": err.start},
        ) from None
    return text


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
MAX_TOP_LOGPROBS = 20
# n x max_tokens x top_logprobs at most: each alternative is an entry of the response (three per token for
# methods with a principled and a plain context), so this bounds what a request can make the server write.
MAX_LOGPROB_ENTRIES = 1 << 16

Text = Annotated[str, AfterValidator(_encodable)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Principle = Annotated[str, AfterValidator(_encodable), AfterValidator(_not_blank)]
Strength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)]
# Linear Alignment's step size: r >= 0 as in the paper (r = 0 is plain principle prompting); to push away from a
# principle, give it a negative weight.
Ratio = Annotated[float, Field(ge=0, le=MAX_STRENGTH, allow_inf_nan=False)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message; text parts are joined and `developer` (OpenAI's newer name for system) is read as system."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _encodable_content(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        # Checked here, not on each branch of the union, so that the error names the content itself.
        for text in [content] if isinstance(content, str) else [p.text for p in content]:
            _encodable(text)
        return content

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class LinalignOptions(BaseModel):
    """How to align, sent by the official client as `extra_body={"linalign": {...}}`.

    Unset strengths fall back to the server's `--ratio` and `AlignConfig`'s defaults.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt knob must fail, not silently use a default

    method: Literal[METHODS] = "la"
    principle: Principle | None = None
    principles: list[Principle] | None = Field(None, max_length=MAX_PRINCIPLES)
    weights: list[Strength] | None = Field(None, max_length=MAX_PRINCIPLES)
    ratio: Ratio | None = None
    lam: Strength | None = None
    plausibility_top_p: Finite | None = None
    amulet_iterations: int | None = Field(None, ge=0, le=MAX_AMULET_ITERATIONS)
    amulet_eta: Finite | None = None
    amulet_alpha: Finite | None = None
    amulet_lambda: Finite | None = None
    # Linear Alignment's quality options (docs/quality.md); AlignConfig checks them.
    kl_budget: Finite | None = None
    repeat_guard: int | None = Field(None, ge=0, le=16)
    mask: Literal[MASKS] | None = None
    plausibility_min_p: Finite | None = None
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

    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=MAX_STRENGTH, allow_inf_nan=False)
    top_p: Finite | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Accepted by the schema only to be refused with a clear message naming the field, not silently ignored.
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    linalign: LinalignOptions | None = None

    @field_validator("tools", "tool_choice", "response_format")
    @classmethod
    def _unsupported(cls, value: object, info: ValidationInfo) -> None:
        if value is not None:
            raise PydanticCustomError("unsupported", f"{info.field_name} is not supported by this server")

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError("needs_logprobs", "top_logprobs needs logprobs: true")
        return value
