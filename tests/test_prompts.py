"""Contexts: the principle as system message, templates without a system role, raw text, conversations."""

from __future__ import annotations

import copy

import pytest

from linalign.prompts import build_ids, to_conversation, with_system

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def text(tokenizer, ids):
    return tokenizer.decode(ids)


def test_principle_becomes_the_system_message(smollm2):
    tok = smollm2.tokenizer
    rendered = text(tok, build_ids(tok, "Hi there", principle="Be brief.", system="You are kind."))
    assert "<|im_start|>system\nYou are kind.\n\nBe brief.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    plain = text(tok, build_ids(tok, "Hi there", system="You are kind."))
    assert "Be brief." not in plain and "You are kind." in plain


def test_template_without_system_role_gets_the_principle_in_the_first_user_turn(smollm2):
    tok = copy.deepcopy(smollm2.tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    rendered = text(tok, build_ids(tok, "Hi there", principle="Be brief."))
    assert "<|im_start|>user\nBe brief.\n\nHi there<|im_end|>" in rendered
    assert "system" not in rendered


def test_raw_mode_and_tokenizers_without_template(smollm2):
    tok = copy.deepcopy(smollm2.tokenizer)
    raw = text(tok, build_ids(tok, "Hi there", principle="Be brief.", raw=True))
    assert raw.strip() == "Be brief.\n\nHi there"
    tok.chat_template = None
    assert text(tok, build_ids(tok, "Hi there", principle="Be brief.")) == raw


def test_multi_turn_conversation_keeps_its_own_system_message(smollm2):
    tok = smollm2.tokenizer
    conversation = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "Where is the gold?"},
    ]
    messages = to_conversation(conversation)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    merged = with_system(messages, None, "Be brief.")
    assert merged[0] == {"role": "system", "content": "You are a pirate.\n\nBe brief."}
    rendered = text(tok, build_ids(tok, conversation, principle="Be brief."))
    assert rendered.count("<|im_start|>system") == 1 and "Arr." in rendered and "Where is the gold?" in rendered


@pytest.mark.parametrize("bad", [[{"role": "user"}], [], [{"role": "assistant", "content": "x"}], "  "])
def test_bad_conversations(bad):
    from linalign import LinalignError

    with pytest.raises(LinalignError):
        to_conversation(bad)
