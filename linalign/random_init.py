"""Models of real shapes with random weights, for measuring speed and memory without downloading anything.

A shipped config (`linalign/configs/NAME.json`, the architecture fields of the public model's config) is built
directly in the chosen dtype on the chosen device: an 8B model never exists in float32, nor on the CPU first.
The tokenizer is the built-in model's — only token ids matter for throughput. Its ids must index the model's
embeddings: a config whose vocabulary is smaller (Mistral-7B's 32768) is enlarged to the tokenizer's size and
the model says so in its name.

    loaded = random_init_model("llama-3.1-8b", dtype="bfloat16", device="cuda")
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from importlib import resources

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from linalign.errors import LinalignError
from linalign.models import _DTYPES, LoadedModel, _gguf_cache_dir, builtin_gguf

log = logging.getLogger("linalign.random_init")


def _configs():
    return resources.files("linalign").joinpath("configs")


def known_configs() -> list[str]:
    """Names `random_init_model` accepts, e.g. `llama-3.2-1b`."""
    return sorted(p.name.removesuffix(".json") for p in _configs().iterdir() if p.name.endswith(".json"))


def _config(name: str) -> dict:
    key = name.lower()
    if key not in known_configs():
        raise LinalignError(f"unknown --random-init config {name!r}; known: {', '.join(known_configs())}")
    return json.loads(_configs().joinpath(f"{key}.json").read_text())


def builtin_tokenizer() -> PreTrainedTokenizerBase:
    """The built-in model's tokenizer, from its de-quantised cache when there is one, else from the GGUF file
    (no weights are de-quantised for it)."""
    gguf = builtin_gguf()
    cached = _gguf_cache_dir(gguf)
    if (cached / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_init_model(name: str, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0) -> LoadedModel:
    """A model of the shape of shipped config `name` with random weights, built in `dtype` on `device`."""
    fields = _config(name)
    if dtype not in _DTYPES or dtype == "auto":
        raise LinalignError(f"--random-init needs an explicit dtype: float32, bfloat16 or float16, not {dtype!r}")
    tokenizer = builtin_tokenizer()
    label = f"{name.lower()} (random weights)"
    if fields["vocab_size"] < len(tokenizer):
        log.warning(
            "vocabulary of %s enlarged from %d to %d for the built-in tokenizer",
            name,
            fields["vocab_size"],
            len(tokenizer),
        )
        label = f"{name.lower()} (random weights, vocabulary {fields['vocab_size']} -> {len(tokenizer)})"
        fields["vocab_size"] = len(tokenizer)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(**{**fields, **special, "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(seed)
    try:
        with torch.device(device), _default_dtype(_DTYPES[dtype]):
            model = AutoModelForCausalLM.from_config(config, dtype=_DTYPES[dtype])
    except (RuntimeError, AssertionError) as err:
        raise LinalignError(f"could not build {name} on {device!r}: {str(err).splitlines()[0]}") from err
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=label, random_weights=True)
