"""Choosing a backend, and every method through the engine on the llama.cpp backend."""

from __future__ import annotations

import pytest
from reference import Paper

from linalign import AlignConfig, Aligner, DecodeConfig, LinalignError
from linalign.models import builtin_gguf, load_model, pick_backend
from linalign.serve import create_app
from linalign.serve.server import serving

pytest.importorskip("llama_cpp")

PRINCIPLE = "Answer in lowercase letters only. Never use capital letters."
QUESTIONS = ["What is the capital of France?", "Name three animals.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def llama() -> Aligner:
    return Aligner(backend="llamacpp")


def test_auto_picks_llama_cpp_for_gguf_files_only(tiny, tmp_path):
    assert pick_backend("auto", builtin_gguf()) == "llamacpp"
    assert pick_backend("auto", tmp_path) == "transformers"
    with pytest.raises(LinalignError, match="runs .gguf files"):
        load_model(tiny.name, backend="llamacpp")
    with pytest.raises(LinalignError, match="unknown backend 'vllm'"):
        load_model(None, backend="vllm")


def test_both_backends_get_the_same_prompt_ids(llama, smollm2):
    hf = Aligner(smollm2)
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    for q in QUESTIONS:
        config = DecodeConfig(max_new_tokens=4)
        assert llama.prepare(q, align, config).term_ids == hf.prepare(q, align, config).term_ids


def test_every_method_decodes_and_ratio_zero_is_prompting(llama):
    config = DecodeConfig(max_new_tokens=12)
    prompt = llama.generate(QUESTIONS, AlignConfig(method="prompt", principles=[PRINCIPLE]), config)
    la0 = llama.generate(QUESTIONS, Paper(method="la", principles=[PRINCIPLE], ratio=0.0), config)
    assert [g.token_ids for g in la0] == [g.token_ids for g in prompt]
    amulet0 = llama.generate(
        QUESTIONS, AlignConfig(method="amulet", principles=[PRINCIPLE], amulet_iterations=0), config
    )
    assert [g.token_ids for g in amulet0] == [g.token_ids for g in prompt]
    # Whether these answers come out in lowercase is a near-tie on this model that llama.cpp's kernels for
    # different instruction sets settle differently; that the amplification changes them is not.
    la = llama.generate(QUESTIONS, AlignConfig(method="la", principles=[PRINCIPLE]), config)
    assert all(g.text for g in la) and [g.text for g in la] != [g.text for g in prompt]
    weighted = AlignConfig(method="la", principles=[PRINCIPLE, "Be rude."], weights=[1.0, -0.5])
    assert all(g.new_tokens for g in llama.generate(QUESTIONS, weighted, config))
    assert all(g.new_tokens for g in llama.generate(QUESTIONS, AlignConfig(method="base"), config))


def test_batched_equals_one_at_a_time_and_seeds_are_per_row(llama):
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    config = DecodeConfig(max_new_tokens=10)
    batched = [g.token_ids for g in llama.generate(QUESTIONS, align, config)]
    assert batched == [llama.generate([q], align, config)[0].token_ids for q in QUESTIONS]
    # Seeded samples repeat, each row has its own seed (seed + its index), and a row samples alike alone.
    sampled = DecodeConfig(max_new_tokens=10, temperature=0.8, seed=4)
    runs = [[g.token_ids for g in llama.generate(QUESTIONS, align, sampled)] for _ in range(2)]
    assert runs[0] == runs[1] and runs[0] != batched
    assert runs[0][0] == llama.generate(QUESTIONS[:1], align, sampled)[0].token_ids


def test_stop_strings_and_streaming(llama):
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    free = llama.generate(QUESTIONS[2:], align, DecodeConfig(max_new_tokens=24))[0]
    stop = free.text[8:12]
    config = DecodeConfig(max_new_tokens=24, stop=[stop])
    streamed = "".join(d.text for deltas in llama.stream(QUESTIONS[2:], align, config) for d in deltas)
    assert streamed == free.text[: free.text.find(stop)] == llama.generate(QUESTIONS[2:], align, config)[0].text


def test_the_server_on_llama_cpp(llama):
    from openai import OpenAI

    with serving(create_app(llama)) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": QUESTIONS[0]}],
            max_tokens=12,
            extra_body={"linalign": {"principle": PRINCIPLE}},
        )
    expected = llama.generate(QUESTIONS[:1], AlignConfig(method="la", principles=[PRINCIPLE]), DecodeConfig(12))
    assert reply.choices[0].message.content == expected[0].text
