"""A few checks on the real built-in SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy
from reference import Paper

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.prompts import build_ids

PRINCIPLE = "Answer in lowercase letters only. Never use capital letters."
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def aligner(smollm2) -> Aligner:
    return Aligner(smollm2)


def _greedy(loaded, ids, n, **kwargs) -> str:
    return loaded.tokenizer.decode(hf_greedy(loaded, ids, n, **kwargs), skip_special_tokens=True)


def test_ratio_zero_equals_plain_generate(aligner, smollm2):
    expected = _greedy(smollm2, build_ids(smollm2.tokenizer, QUESTION, PRINCIPLE), 32)
    got = aligner.generate(
        [QUESTION], Paper(method="la", principles=[PRINCIPLE], ratio=0.0), DecodeConfig(max_new_tokens=32)
    )
    assert got[0].text == expected


def test_unmasked_la_equals_hf_cfg(aligner, smollm2):
    plain = build_ids(smollm2.tokenizer, QUESTION)
    expected = _greedy(
        smollm2,
        build_ids(smollm2.tokenizer, QUESTION, PRINCIPLE),
        32,
        guidance_scale=3.0,
        negative_prompt_ids=torch.tensor([plain]),
    )
    align = Paper(method="la", principles=[PRINCIPLE], ratio=2.0, plausibility_top_p=0)
    assert aligner.generate([QUESTION], align, DecodeConfig(max_new_tokens=32))[0].text == expected


def test_linear_alignment_makes_the_lowercase_principle_stick(aligner):
    config = DecodeConfig(max_new_tokens=32)
    prompt = aligner.generate([QUESTION], AlignConfig(method="prompt", principles=[PRINCIPLE]), config)[0]
    aligned = aligner.generate([QUESTION], AlignConfig(method="la", principles=[PRINCIPLE], ratio=2.0), config)[0]
    assert any(c.isupper() for c in prompt.text)  # plain principle prompting ignores it
    assert aligned.text and aligned.text == aligned.text.lower()
    assert "paris" in aligned.text


def test_eos_and_stop_strings_end_sequences(aligner):
    out = aligner.generate(
        [QUESTION, "Name three famous scientists."],
        AlignConfig(method="base"),
        DecodeConfig(max_new_tokens=60, stop=["2."]),
    )
    assert out[0].finish_reason == "stop" and out[0].new_tokens < 60
    assert out[1].finish_reason == "stop" and out[1].text.startswith("1.") and "2." not in out[1].text


def test_sequences_that_finish_early_leave_the_batch_without_changing_the_others(aligner):
    questions = [QUESTION, "Name three famous scientists.", "Why is the sky blue?"]
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=2.0)
    config = DecodeConfig(max_new_tokens=40, stop=["Marie"])
    batched = aligner.generate(questions, align, config)
    single = [aligner.generate([q], align, config)[0] for q in questions]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert len({g.new_tokens for g in batched}) > 1  # rows really finished at different steps
