"""Request bodies of the OpenAI-compatible endpoint, with linalign's own `linalign` object.

Every field that costs the server work per unit is bounded here, so a small body cannot buy a large bill:
the limits are named in the 400 a request over them gets. The knobs' fields and their limits come from their
declarations (`linalign.params`); the rest is OpenAI's request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from linalign.params import ALIGN, KNOBS, MAX_PRINCIPLES, METHODS, Knob, request_type


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


MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = KNOBS["logprobs"].limits["le"]
# n x max_tokens x top_logprobs at most: each alternative is an entry of the response (three per token for
# methods with a principled and a plain context), so this bounds what a request can make the server write.
MAX_LOGPROB_ENTRIES = 1 << 16

Text = Annotated[str, AfterValidator(_encodable)]
Principle = Annotated[str, AfterValidator(_encodable), AfterValidator(_not_blank)]
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


class _Options(BaseModel):
    """How to align, sent by the official client as `extra_body={"linalign": {...}}`: the method, the principles
    and every knob of `linalign.params.ALIGN` (`LinalignOptions`).

    Unset knobs fall back to the server's `--ratio` and the knobs' defaults.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt knob must fail, not silently use a default

    method: Literal[METHODS] = "la"
    principle: Principle | None = None
    principles: list[Principle] | None = Field(None, max_length=MAX_PRINCIPLES)

    @model_validator(mode="after")
    def _one_way_to_give_principles(self) -> _Options:
        if self.principle is not None and self.principles is not None:
            raise ValueError("give either principle or principles, not both")
        return self

    def principle_list(self) -> list[str]:
        return [self.principle] if self.principle is not None else list(self.principles or [])

    def knobs(self) -> dict:
        """The knobs the request sets."""
        return self.model_dump(exclude_none=True, exclude={"method", "principle", "principles"})


def options_schema(knobs: Sequence[Knob] = ALIGN) -> type[_Options]:
    """The `linalign` object with one field per knob, under the knob's request limits."""
    fields = {k.name: (request_type(k), None) for k in knobs}
    return create_model("LinalignOptions", __base__=_Options, __doc__=_Options.__doc__, **fields)


LinalignOptions = options_schema()
Temperature = request_type(KNOBS["temperature"])
TopP = request_type(KNOBS["top_p"])
Seed = request_type(KNOBS["seed"])
TopLogprobs = request_type(KNOBS["logprobs"])
MaxTokens = request_type(KNOBS["max_new_tokens"])


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request that local decoding can honour; other fields are ignored."""

    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    seed: Seed = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs = None
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
