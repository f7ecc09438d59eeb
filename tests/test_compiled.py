"""The compiled, static-cache backend against the eager engine: token for token under greedy decoding.

Compiling a tiny model takes ~10 s on two CPU cores with inductor's on-disk cache warm (~80 s cold), once per
(model, rows, cache length); the tests share shapes where they can. The bookkeeping of the static batch (growth
past its length, compaction) is tested with the step run eagerly, which needs no compiler.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from linalign import AlignConfig, Aligner, DecodeConfig, LinalignError
from linalign.backends import compiled as compiled_module
from linalign.backends.compiled import CompiledBackend, CompiledModel
from linalign.backends.transformers import TransformersBackend
from linalign.compute import on_compute_thread
from linalign.models import LoadedModel

PRINCIPLE = "Answer in lowercase letters only."
QUESTIONS = ["What is the capital of France?", "Name three animals that live in the sea, please.", "Why?"]
LENGTHS = (3, 14, 8)  # rows finish early, at different steps
PROGRAMS_LIMIT = torch._dynamo.config.recompile_limit  # the program's own setting, which linalign leaves alone


def tokens(aligner: Aligner, align: AlignConfig, lengths=LENGTHS, questions=QUESTIONS) -> list[list[int]]:
    prepared = [
        aligner.prepare(q, align, DecodeConfig(max_new_tokens=n)) for q, n in zip(questions, lengths, strict=True)
    ]
    got: list[list[int]] = [[] for _ in prepared]
    for events in aligner.decode(prepared):
        for e in events:
            got[e.key].append(e.token)
    return got


@pytest.fixture(scope="module")
def eager(tiny, tiny_other) -> Aligner:
    return Aligner(tiny, reference=tiny_other)


@pytest.fixture(scope="module")
def compiled(tiny, tiny_other) -> Aligner:
    return Aligner(tiny, reference=tiny_other, compile=True)


@pytest.mark.slow  # torch.compile takes seconds: not in the unit tier
def test_compiled_la_equals_eager_with_mixed_prompts_and_rows_finishing_early(eager, compiled):
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=2.0)
    expected = tokens(eager, align)
    assert tokens(compiled, align) == expected
    assert [len(t) for t in expected] == list(LENGTHS)
    assert not compiled.main.compiled.eager  # the step really ran compiled
    # dynamo's settings are per thread: neither the caller's nor the compute thread's keeps linalign's limit
    assert torch._dynamo.config.recompile_limit == PROGRAMS_LIMIT
    assert on_compute_thread(lambda: torch._dynamo.config.recompile_limit)() == PROGRAMS_LIMIT


@pytest.mark.slow  # torch.compile takes seconds: not in the unit tier
def test_compiled_dera_and_plain_decoding_equal_eager(eager, compiled):
    for align in (AlignConfig(method="dera", lam=1.5), AlignConfig(method="base")):
        assert tokens(compiled, align) == tokens(eager, align)


@pytest.mark.slow  # torch.compile takes seconds: not in the unit tier
def test_a_running_static_batch_takes_no_new_sequences(compiled):
    decoder = compiled.decoder()
    decoder.add(0, compiled.prepare(QUESTIONS[0], AlignConfig(method="base"), DecodeConfig(max_new_tokens=4)))
    decoder.step()
    assert not decoder.can_add
    while len(decoder):
        decoder.step()
    assert decoder.can_add  # empty again: the next batch may start


def _eager_step(loaded: LoadedModel) -> CompiledModel:
    model = CompiledModel(loaded.model, loaded.tokenizer.pad_token_id)
    model.eager = True  # the static-cache bookkeeping without the compiler
    return model


def test_static_batch_grows_past_its_length_and_compacts_like_the_eager_cache(tiny, monkeypatch):
    monkeypatch.setattr(compiled_module, "LENGTH_STEP", 16)  # grow after a few steps, not 128
    prompts = [[1, 5, 9, 13, 17, 21, 25], [1, 7], [1, 2, 3, 4]]
    reference = TransformersBackend(tiny.model, tiny.tokenizer.pad_token_id)
    static = CompiledBackend(_eager_step(tiny), capacity=3 * 5)
    torch.testing.assert_close(static.add(prompts), reference.add(prompts))
    assert static.size == 16
    generator = torch.Generator().manual_seed(0)
    for step in range(30):
        if step == 5:
            kept = torch.tensor([0, 2])
            static.keep(kept)
            reference.keep(kept)
        ids = torch.randint(0, 1000, (reference.rows,), generator=generator)
        torch.testing.assert_close(static.step(ids), reference.step(ids), atol=1e-4, rtol=1e-4)
    assert static.rows == 2 and static.size == 48  # 7 + 30 tokens: grown twice
    static.keep(torch.tensor([], dtype=torch.long))
    assert static.rows == 0 and static.can_merge


def test_compaction_every_k_steps_keeps_the_tokens(eager, tiny, tiny_other):
    """With `compact_every`, finished rows leave the static batch at most every k steps."""
    model = replace(tiny, compiled=_eager_step(tiny))
    aligner = Aligner(model, reference=replace(tiny_other, compiled=_eager_step(tiny_other)), compile=True)
    kept = []
    original = CompiledBackend.keep

    def keep(self, rows):
        kept.append(len(rows))
        original(self, rows)

    align = AlignConfig(method="la", principles=[PRINCIPLE])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompiledBackend, "keep", keep)
        patch.setattr(CompiledBackend, "__init__", _with_compaction(CompiledBackend.__init__, 4))
        assert tokens(aligner, align) == tokens(eager, align)
    assert kept == [4, 2, 0]  # after the 3-token row finished, then the 8-token one, then all


def _with_compaction(init, every: int):
    def wrapped(self, compiled, capacity=None, compact_every=None):
        init(self, compiled, capacity, every)

    return wrapped


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(eager, tiny, caplog):
    loaded = replace(tiny, compiled=None)
    aligner = Aligner(loaded, compile=True)

    def broken(*args):
        raise RuntimeError("no compiler here")

    loaded.compiled._compiled = broken
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    with caplog.at_level(logging.WARNING, logger="linalign.compiled"):
        assert tokens(aligner, align) == tokens(Aligner(tiny), align)
    assert loaded.compiled.eager
    assert "decoding eagerly" in caplog.text


def test_compile_refuses_a_sliding_window_model_before_generating(tiny):
    config = MistralConfig(
        vocab_size=len(tiny.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=16,
    )
    loaded = replace(tiny, model=MistralForCausalLM(config).eval(), compiled=None)
    with pytest.raises(LinalignError, match="--compile cannot be used with mistral: .*sliding-window"):
        Aligner(loaded, compile=True)
    Aligner(loaded)  # eager decoding of the same model is fine


@pytest.mark.slow
def test_compiled_equals_eager_on_the_builtin_model(smollm2):
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=2.0)
    expected = tokens(Aligner(smollm2), align, lengths=(6, 24, 12))
    assert tokens(Aligner(smollm2, compile=True), align, lengths=(6, 24, 12)) == expected
    assert not smollm2.compiled.eager


@pytest.mark.slow  # torch.compile takes seconds: not in the unit tier
def test_symbolic_sizes_from_the_start_equal_eager(eager, tiny, monkeypatch):
    """The GPU benchmark compiles with symbolic sizes from the first call (one compilation per model)."""
    monkeypatch.setattr(compiled_module, "DYNAMIC", True)
    aligner = Aligner(replace(tiny, compiled=None), compile=True)
    for align in (AlignConfig(method="la", principles=[PRINCIPLE]), AlignConfig(method="base")):
        assert tokens(aligner, align) == tokens(eager, align)
    assert not aligner.main.compiled.eager


# -- random-weight models of shipped shapes ---------------------------------------------------------------------


def test_random_init_builds_in_the_dtype_asked_and_names_the_known_shapes():
    from linalign.random_init import known_configs, random_init_model

    assert {"llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "tiny"} <= set(known_configs())
    loaded = random_init_model("tiny", dtype="bfloat16", device="cpu")
    assert loaded.random_weights and "random weights" in loaded.name
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.vocab_size >= len(loaded.tokenizer)
    with pytest.raises(LinalignError, match="unknown --random-init config 'gpt-9'; known: .*llama-3.1-8b"):
        random_init_model("gpt-9")


def test_random_init_shapes_match_the_public_models():
    """Built on the meta device (no memory): parameter counts of the public checkpoints."""
    from linalign.random_init import random_init_model

    billions = {"llama-3.2-1b": 1.236, "llama-3.1-8b": 8.030, "qwen2.5-7b": 7.616}
    for name, expected in billions.items():
        model = random_init_model(name, dtype="bfloat16", device="meta").model
        assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == expected
        assert compiled_module.compile_problem(model) is None
    mistral = random_init_model("mistral-7b", dtype="bfloat16", device="meta")
    assert "vocabulary 32768 -> 49152" in mistral.name  # enlarged for the built-in tokenizer's ids


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: seconds
def test_importing_linalign_leaves_torch_settings_alone():
    import subprocess
    import sys

    code = (
        "import torch; before = torch._dynamo.config.recompile_limit; import linalign, linalign.backends.compiled; "
        "assert torch._dynamo.config.recompile_limit == before, torch._dynamo.config.recompile_limit"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
