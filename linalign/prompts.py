"""Where prompts are built: a conversation, with or without a principle, rendered to token ids.

The principle becomes (part of) the system message through the tokenizer's own chat template, or is
prefixed to the last user turn, or both (`place_principle`). Templates without a system role get the
system message prefixed to the first user turn; tokenizers without a template (base models) get plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from linalign.errors import LinalignError
from linalign.params import KNOBS, check

Message = dict[str, str]
Conversation = list[Message]
_ROLES = ("system", "user", "assistant")


def to_conversation(prompt: str | Conversation) -> Conversation:
    """A question (a string, taken as it is: never parsed) or a list of `{role, content}` messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise LinalignError("prompt is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise LinalignError("a conversation must be a non-empty list of {role, content} messages")
    for i, message in enumerate(prompt):
        if (
            not isinstance(message, dict)
            or message.get("role") not in _ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise LinalignError(
                f"message {i} must be an object with role in {_ROLES} and a string content, got {message!r}"
            )
    if not any(m["role"] == "user" and m["content"].strip() for m in prompt):
        raise LinalignError("the conversation has no non-empty user message")
    return [dict(m) for m in prompt]


def parse_conversations(lines: Iterable[str], source: str) -> list[Conversation]:
    """Conversations from JSON lines: each line a list of messages or an object with a `messages` list."""
    conversations = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise LinalignError(f"{source} line {number} is not valid JSON: {err}") from None
        messages = value.get("messages") if isinstance(value, dict) else value
        try:
            conversations.append(to_conversation(messages if isinstance(messages, list) else None))
        except LinalignError as err:
            raise LinalignError(f"{source} line {number}: {err}") from None
    if not conversations:
        raise LinalignError(f"{source} holds no conversation")
    return conversations


def _join(*parts: str | None) -> str:
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def with_system(conversation: Conversation, system: str | None, principle: str | None) -> Conversation:
    """The conversation with `system` and `principle` merged into its system message (kept first)."""
    messages = [dict(m) for m in conversation]
    existing = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
    text = _join(existing, system, principle)
    return ([{"role": "system", "content": text}] if text else []) + messages


def place_principle(
    conversation: Conversation, system: str | None, principle: str | None, placement: str = "system"
) -> Conversation:
    """The conversation with `system` merged into its system message and `principle` where `placement` says:
    in the system message ("system"), prefixed to the last user turn ("user", nearest the question), or both."""
    check(KNOBS["principle_placement"], placement)
    messages = with_system(conversation, system, principle if placement in ("system", "both") else None)
    if placement in ("user", "both") and principle and principle.strip():
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = _join(principle, messages[last]["content"])
    return messages


@lru_cache(maxsize=64)
def _template_supports_system(tokenizer: PreTrainedTokenizerBase) -> bool:
    probe = "linalign-system-probe"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}], tokenize=False
        )
    except Exception:  # templates signal "no system role" by raising from inside Jinja
        return False
    return probe in rendered


def _fold_system_into_user(messages: Conversation) -> Conversation:
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first_user = next(i for i, m in enumerate(rest) if m["role"] == "user")
    rest[first_user]["content"] = _join(system, rest[first_user]["content"])
    return rest


def render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, raw: bool = False) -> list[int]:
    """Token ids of `messages` ready for the assistant's reply."""
    if raw or not tokenizer.chat_template:
        text = _join(*(m["content"] for m in messages)) + "\n"
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    if not _template_supports_system(tokenizer):
        messages = _fold_system_into_user(messages)
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def build_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Conversation,
    principle: str | None = None,
    system: str | None = None,
    raw: bool = False,
    placement: str = "system",
) -> list[int]:
    """Token ids of one context: the prompt, the base `system` prompt, and optionally the principle, placed as
    `place_principle` does."""
    return render(tokenizer, place_principle(to_conversation(prompt), system, principle, placement), raw=raw)
