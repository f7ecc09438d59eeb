"""The compiled backend: rows are one left-padded batch in a pre-allocated (static) KV cache, and the decode step
runs under `torch.compile` (CUDA graphs on CUDA: `mode="reduce-overhead"`).

On a GPU, eager decoding of a small batch is bound by kernel launches and host round trips, not by arithmetic.
A static cache keeps every tensor's shape and address fixed from one step to the next, so the whole step can be
compiled and replayed. Per step only three small in-place updates run outside the
compiled graph — the new token ids copied in, the attention mask's next column set, the positions advanced — and
none of them waits for the device: the cache length is tracked on the host.

Rows cannot join a running batch (`can_merge` is False), and finished rows stay in the batch (`can_drop` is
False, so the decode loop feeds them padding) unless `compact_every=k` is given: then finished rows are dropped at
most every k steps, into a smaller static batch, which costs a new compiled graph per row count.

The cache holds `length` tokens per row: the longest prompt plus the new tokens the `capacity` hint leaves room for
(rounded up to a multiple of 128, so that nearby lengths share a compiled graph). A batch that outgrows it moves
to a longer cache; that compiles once more but never fails.

Models whose cache is not one plain key/value store per layer (sliding-window, hybrid, recurrent) or that
`transformers` does not mark as compilable are refused with a `LinalignError` when the model is opened for
compiled decoding, before any generation. If compilation itself fails at the first step, the failure is logged
and the same static cache is driven by the eager forward instead.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

import torch
import torch._dynamo.config
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from linalign.backends import Whole
from linalign.backends.transformers import _cache_argument, left_padded
from linalign.errors import LinalignError

log = logging.getLogger("linalign.compiled")

LENGTH_STEP = 128  # cache lengths are rounded up to this, so that nearby lengths share a compiled graph
DEFAULT_NEW_TOKENS = 256  # room for new tokens when no capacity hint is given
CUDA_MODE = "reduce-overhead"  # torch.compile's mode on CUDA: inductor kernels replayed as CUDA graphs
# None: each (rows, length) is compiled for its own shape until a second one is seen, after which one graph with
# symbolic sizes serves them all (CUDA graphs are still recorded per shape) - two compilations, not one per batch.
DYNAMIC: bool | None = None
RECOMPILE_LIMIT = 64  # graphs of one step, while linalign's calls run: one per (model, rows, length) in use
POOL = 4  # free static caches kept per model for reuse (the most recent); older ones are freed
COMPACT_EVERY: int | None = None  # default of `CompiledBackend(compact_every=...)`: finished rows stay, masked


def compile_problem(model: PreTrainedModel) -> str | None:
    """Why `model` cannot take the compiled path, or None when it can."""
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return f"transformers does not support compiling {type(model).__name__} with a static cache"
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1:
        return "the model is split over several devices (device_map='auto')"
    layers = StaticCache(config=model.config, max_cache_len=1).layers
    if not layers or any(type(layer) is not StaticLayer for layer in layers):
        return "its cache has sliding-window or non-attention layers, which the static batch does not handle"
    return None


def round_length(tokens: int) -> int:
    return max(LENGTH_STEP, math.ceil(tokens / LENGTH_STEP) * LENGTH_STEP)


class CompiledModel:
    """One model's compiled decode step, shared by every backend opened on it, and a pool of free static caches
    (a cache is pinned to its addresses by the compiled graphs, so reusing it avoids re-recording them)."""

    def __init__(self, model: PreTrainedModel, pad_id: int) -> None:
        problem = compile_problem(model)
        if problem:
            raise LinalignError(f"--compile cannot be used with {model.config.model_type}: {problem}")
        self.model, self.pad_id = model, pad_id
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        self._cache_name = _cache_argument(model)
        mode = CUDA_MODE if self.cuda else None  # CUDA graphs on CUDA; inductor's default elsewhere
        self._compiled = torch.compile(self.forward, mode=mode, dynamic=DYNAMIC, fullgraph=True)
        self.eager = False  # set when compilation failed: the step then runs eagerly
        self._pool: list[tuple[tuple[int, int], StaticCache]] = []  # (rows, length), oldest first
        self._lock = threading.Lock()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Float32 next-token logits `[rows, V]` of the last position."""
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_name: cache},
        )
        return out.logits[:, -1, :].float()

    def step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One decode step, compiled unless compiling failed (logged once, then eager for good)."""
        if not self.eager:
            try:
                if self.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                # Every (model, rows, length) is its own graph of the same code object; the default limit of 8
                # would silently send a benchmark over two models and three batch sizes back to eager. Raised
                # for linalign's own calls only: the program's other compiled code keeps its settings.
                limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
                with torch._dynamo.config.patch(recompile_limit=limit):
                    # CUDA graphs overwrite their outputs at the next replay: the caller gets its own copy.
                    return self._compiled(ids, mask, positions, cache).clone()
            except Exception as err:  # noqa: BLE001 - any compiler failure: decode on, eagerly
                log.warning(
                    "torch.compile failed (%s: %s); decoding eagerly with the static cache", type(err).__name__, err
                )
                self.eager = True
        return self.forward(ids, mask, positions, cache)

    def take(self, rows: int, length: int) -> StaticCache:
        """A zeroed static cache of `rows` x `length` tokens, reused from the pool when one is free."""
        with self._lock:
            found = next((i for i, (key, _) in enumerate(self._pool) if key == (rows, length)), None)
            cache = self._pool.pop(found)[1] if found is not None else None
        if cache is None:
            return StaticCache(config=self.model.config, max_cache_len=length)
        cache.reset()
        return cache

    def give_back(self, cache: StaticCache, rows: int, length: int) -> None:
        with self._lock:
            self._pool.append(((rows, length), cache))
            del self._pool[:-POOL]


def _copy_rows(target: StaticCache, source: StaticCache, rows: torch.Tensor, length: int) -> None:
    """Fill `target` with the first `length` positions of `source`'s `rows`, allocating it if it is fresh."""
    for new, old in zip(target.layers, source.layers, strict=True):
        if not new.is_initialized:
            new.lazy_initialization(old.keys[rows, :, :1], old.values[rows, :, :1])
        new.keys[:, :, :length] = old.keys[rows, :, :length]
        new.values[:, :, :length] = old.values[rows, :, :length]
        new.cumulative_length.fill_(length)


class CompiledBackend:
    """Rows of one model in a static cache, stepped by the compiled forward (see the module docstring)."""

    kv_capacity = None  # the static cache grows into a longer one rather than refuse rows
    used = 0
    chunked_prefill = False  # prompts are prefilled together, in one eager pass, into an empty batch

    def __init__(self, compiled: CompiledModel, capacity: int | None = None, compact_every: int | None = None) -> None:
        self.compiled, self.capacity = compiled, capacity
        self.compact_every = compact_every if compact_every is not None else COMPACT_EVERY
        self.device = compiled.device
        self.cache: StaticCache | None = None
        self.length = 0  # tokens written per row (the cache's cumulative length, kept on the host)
        self.size = 0  # tokens the cache holds per row
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.positions = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self.ids = torch.zeros((0, 1), dtype=torch.long, device=self.device)
        self._since_compaction = 0

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def can_merge(self) -> bool:
        """New rows join only an empty batch: the static batch's shape is fixed while it decodes."""
        return self.rows == 0

    @property
    def can_drop(self) -> bool:
        """Finished rows stay (masked out) unless compaction is on and k steps have passed since the last one."""
        return self.rows == 0 or (self.compact_every is not None and self._since_compaction >= self.compact_every)

    def _size_for(self, prompts: Sequence[Sequence[int]]) -> int:
        """Tokens per row: the longest prompt plus the new tokens the capacity hint implies (all rows alike)."""
        width = max(len(p) for p in prompts)
        if self.capacity is None:
            return round_length(width + DEFAULT_NEW_TOKENS)
        mean = sum(len(p) for p in prompts) / len(prompts)
        new = max(1, math.ceil(self.capacity / len(prompts) - mean))
        return round_length(width + new)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Whole:
        return Whole(self, prompts)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.rows:
            raise RuntimeError("the compiled backend cannot take new rows while others decode")
        ids, mask, positions = left_padded(prompts, self.compiled.pad_id, self.device)
        rows, width = ids.shape
        self.size = self._size_for(prompts)
        self.cache = self.compiled.take(rows, self.size)
        self.mask = torch.zeros((rows, self.size), dtype=torch.long, device=self.device)
        self.mask[:, :width] = mask
        self.length = width
        self.positions = positions[:, -1:].clone()
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=self.device)
        self._mark_static()
        self._since_compaction = 0
        return self.compiled.forward(ids, self.mask, positions, self.cache)  # prefill: eager, shapes vary

    def _mark_static(self) -> None:
        """The step's own inputs keep their addresses, so CUDA graphs read them in place instead of copying."""
        if self.compiled.cuda:
            for t in (self.mask, self.positions, self.ids):
                torch._dynamo.mark_static_address(t)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length >= self.size:
            self._regroup(torch.arange(self.rows, device=self.device), self.size + LENGTH_STEP)
        self.ids.copy_(tokens.view(-1, 1))
        self.mask[:, self.length] = 1
        self.positions += 1
        self.length += 1
        self._since_compaction += 1
        return self.compiled.step(self.ids, self.mask, self.positions, self.cache)

    @torch.inference_mode()
    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        if len(rows) == 0:
            if self.cache is not None:
                self.compiled.give_back(self.cache, self.rows, self.size)
            self.cache, self.length = None, 0
            self.mask, self.positions, self.ids = self.mask[:0], self.positions[:0], self.ids[:0]
            return
        if len(rows) < self.rows:
            self._regroup(rows, self.size)
        self._since_compaction = 0

    def _regroup(self, rows: torch.Tensor, size: int) -> None:
        """Move `rows` into a fresh static cache of `size` tokens per row (compaction, or growth)."""
        cache = self.compiled.take(len(rows), size)
        _copy_rows(cache, self.cache, rows, self.length)
        self.compiled.give_back(self.cache, self.rows, self.size)
        mask = torch.zeros((len(rows), size), dtype=torch.long, device=self.device)
        mask[:, : self.length] = self.mask[rows, : self.length]
        self.cache, self.size, self.mask = cache, size, mask
        self.positions = self.positions[rows].clone()
        self.ids = torch.zeros((len(rows), 1), dtype=torch.long, device=self.device)
        self._mark_static()
