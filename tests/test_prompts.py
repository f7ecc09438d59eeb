"""Contexts: the principle as system message, before the last user turn or both, templates without a system role,
raw text, conversations."""

from __future__ import annotations

import copy

import pytest

from linalign.prompts import build_ids, place_principle, to_conversation, with_system

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


QUESTION, PRINCIPLE = "Hi there", "Be brief."
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's own
REPLY = "<|im_start|>assistant\n"
RENDERED = {
    "system": f"<|im_start|>system\n{PRINCIPLE}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n{REPLY}",
    "user": f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{PRINCIPLE}\n\n{QUESTION}<|im_end|>\n"
    + REPLY,
    "both": f"<|im_start|>system\n{PRINCIPLE}<|im_end|>\n<|im_start|>user\n{PRINCIPLE}\n\n{QUESTION}<|im_end|>\n"
    + REPLY,
}
PLAIN = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n{REPLY}"


@pytest.mark.parametrize("placement", RENDERED)
def test_each_placement_renders_exactly_on_the_built_in_template(tokenizer, placement):
    assert tokenizer.decode(build_ids(tokenizer, QUESTION, PRINCIPLE, placement=placement)) == RENDERED[placement]
    assert tokenizer.decode(build_ids(tokenizer, QUESTION, placement=placement)) == PLAIN


def test_the_principle_goes_before_the_last_user_turn_and_a_system_prompt_stays_in_the_system_message(tokenizer):
    conversation = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "Where is the gold?"},
    ]
    rendered = tokenizer.decode(build_ids(tokenizer, conversation, PRINCIPLE, "Speak English.", placement="user"))
    assert rendered == (
        "<|im_start|>system\nYou are a pirate.\n\nSpeak English.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nArr.<|im_end|>\n"
        f"<|im_start|>user\n{PRINCIPLE}\n\nWhere is the gold?<|im_end|>\n{REPLY}"
    )
    assert conversation[3]["content"] == "Where is the gold?"  # the caller's messages are not changed
    both = place_principle(conversation, None, PRINCIPLE, "both")
    assert both[0]["content"] == f"You are a pirate.\n\n{PRINCIPLE}" and both[1]["content"] == "Hello"
    assert both[3]["content"] == f"{PRINCIPLE}\n\nWhere is the gold?"


def test_a_template_without_a_system_role_folds_the_system_message_into_the_first_user_turn(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    conversation = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr."},
        {"role": "user", "content": "Where?"},
    ]
    turns = "<|im_start|>assistant\nArr.<|im_end|>\n<|im_start|>user\n"
    user = tok.decode(build_ids(tok, conversation, PRINCIPLE, "Be kind.", placement="user"))
    assert user == f"<|im_start|>user\nBe kind.\n\nHello<|im_end|>\n{turns}{PRINCIPLE}\n\nWhere?<|im_end|>\n{REPLY}"
    system = tok.decode(build_ids(tok, conversation, PRINCIPLE, "Be kind."))
    assert system == f"<|im_start|>user\nBe kind.\n\n{PRINCIPLE}\n\nHello<|im_end|>\n{turns}Where?<|im_end|>\n{REPLY}"
