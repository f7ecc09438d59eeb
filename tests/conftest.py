"""Shared fixtures: tiny random models (fast) and the real built-in SmolLM2 (slow, loaded once)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from linalign.models import LoadedModel, load_model

# Pin the CPU matrix-product form: `auto` picks it by a 0.2-s timing, which a busy machine can tip the other way,
# and the two forms round differently.
os.environ.setdefault("LINALIGN_KERNEL", "transposed")


def hf_greedy(loaded: LoadedModel, ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Plain `transformers` greedy decoding of one unpadded prompt: the reference the engine must match."""
    out = loaded.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=loaded.tokenizer.pad_token_id,
        **kwargs,
    )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model()


def make_tiny(tokenizer, seed: int, path) -> LoadedModel:
    """A 2-layer random Llama over SmolLM2's tokenizer, so chat templates are real."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,  # peaked logits, as a trained model has: greedy choices are not decided by float noise
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(str(path))


@pytest.fixture(scope="session")
def tiny(tokenizer, tmp_path_factory) -> LoadedModel:
    return make_tiny(tokenizer, 0, tmp_path_factory.mktemp("tiny0"))


@pytest.fixture(scope="session")
def tiny_other(tokenizer, tmp_path_factory) -> LoadedModel:
    return make_tiny(tokenizer, 1, tmp_path_factory.mktemp("tiny1"))


@pytest.fixture(scope="session")
def tokenizer():
    """The built-in model's tokenizer alone, for tests that need no model."""
    from transformers import AutoTokenizer

    from linalign.models import _dequantised, builtin_gguf

    return AutoTokenizer.from_pretrained(_dequantised(builtin_gguf()))


# The tiers, by module: what each test needs beyond tiny models in this process.
TIERS = {
    "test_backends": "model",
    "test_serve": "server",
    "test_serve_load": "server",
    "test_serve_shutdown": "server",
    "test_serve_fair": "server",
    "test_playground": "browser",
    "test_ray": "cluster",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers as markers: `model` (the real built-in model), `server` (a real HTTP server), `browser` (Chromium),
    `cluster` (Ray); each of them is also `slow`, so `-m "not slow"` runs the unit tier alone (under a minute)."""
    for item in items:
        tier = TIERS.get(item.path.stem)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if "smollm2" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.model)
        if tier or item.get_closest_marker("model"):
            item.add_marker(pytest.mark.slow)
