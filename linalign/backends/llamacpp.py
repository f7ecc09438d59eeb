"""The llama.cpp backend: GGUF models run by `llama-cpp-python`'s low-level API, every row a llama.cpp sequence.

Each row of the decode loop is one llama.cpp sequence (`seq_id`) with its own KV cells in one unified cache, so one
`llama_decode` advances every context of every sequence together — one read of the weights per step, which is what
makes the second context of Linear Alignment cheap. Prefill of new rows is batched the same way, with logits
requested only at each row's last position, and a prefix several new rows share (a system prompt, a principle,
copies of one prompt) enters the batch once, its cells held by every one of them: fewer tokens to prefill, and
cheaper steps after, since every row's attention runs over all the cells in use. Dropped rows give their cells and
their `seq_id` back, and a closed (or collected) backend gives its context back to the model, emptied, for the next
one of that size: creating a context costs ~40 ms, a fifth of a 48-token reply's decoding on the built-in model.

Tokenisation stays with the Hugging Face tokenizer (the engine hands token ids over); `LlamaCppModel.tokenize`
exposes llama.cpp's own so tests can check that both agree.

    model = LlamaCppModel("model.gguf")
    backend = model.open(capacity=2 * (40 + 128))  # KV cells for two rows of 40-token prompts + 128 new tokens
    logits = backend.add([principled_ids, plain_ids])
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from linalign.errors import LinalignError

try:
    import llama_cpp as _ll
except ImportError:  # pragma: no cover - exercised only where the extra is absent
    _ll = None

log = logging.getLogger("linalign.llamacpp")

_MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ: seq ids must stay below it
_MAX_BATCH = 2048  # tokens per llama_decode call; longer prefills are split
_CTX_PAD = 256  # llama.cpp's granularity of n_ctx, and >= _MAX_SEQ
_IDLE_CONTEXTS = 4  # contexts a model keeps for reuse after their rows are done (creating one takes ~40 ms)
_GGML_LOG_ERROR = 3


def _log_to_python(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """llama.cpp logs every tensor and buffer at load; only its errors are worth a user's attention."""
    message = text.decode("utf-8", "replace").rstrip()
    if message:
        log.log(logging.ERROR if level == _GGML_LOG_ERROR else logging.DEBUG, "%s", message)


_log_callback = _ll.llama_log_callback(_log_to_python) if _ll is not None else None
_initialised = False


def _init_llama() -> None:
    global _initialised
    if _ll is None:
        raise LinalignError("the llama.cpp backend needs llama-cpp-python: pip install 'linalign[llamacpp]'")
    if not _initialised:
        _ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _ll.llama_backend_init()
        _initialised = True


def physical_cores() -> int:
    """Cores this process may run on, counting hyper-threads once: llama.cpp gains nothing from SMT siblings."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:
            cores.add(cpu)
    return max(1, len(cores))


class LlamaCppModel:
    """A GGUF model loaded once; `open` gives independent sets of rows (contexts) over its weights.

    `threads` defaults to the physical cores. `ubatch` is the most tokens llama.cpp computes in one pass.
    llama.cpp's CPU attention switches to a tiled kernel from 64 query tokens in a pass, which moves logits by
    up to ~1 on quantised models; with `ubatch` below 64 every pass takes the kernel a decode step takes, so
    results do not depend on how prompts were batched or cached (tests use it; on CPU prefill barely slows).
    """

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None, ubatch: int = 512) -> None:
        _init_llama()
        self.path = Path(path)
        if not self.path.is_file():
            raise LinalignError(f"model file {str(path)!r} does not exist")
        self.threads = threads or physical_cores()
        self.ubatch = ubatch
        params = _ll.llama_model_default_params()
        model = _ll.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise LinalignError(f"llama.cpp could not load {str(path)!r} (not a GGUF model it supports?)")
        self._model = model
        self._vocab = _ll.llama_model_get_vocab(model)
        self.vocab_size: int = _ll.llama_vocab_n_tokens(self._vocab)
        self.context_length: int = _ll.llama_model_n_ctx_train(model)
        self._idle: list[tuple[int, ctypes.c_void_p]] = []  # (n_ctx, context) of finished backends, oldest first
        self._idle_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @cached_property
    def eos_ids(self) -> tuple[int, ...]:
        """Every end-of-generation token llama.cpp knows for this vocabulary (EOS, EOT, `<|im_end|>`, ...)."""
        return tuple(t for t in range(self.vocab_size) if _ll.llama_vocab_is_eog(self._vocab, t))

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """llama.cpp's own tokenisation (BOS as the GGUF asks; `special` parses `<|im_start|>` and the like)."""
        data = text.encode()
        room = len(data) + 8
        buffer = (_ll.llama_token * room)()
        n = _ll.llama_tokenize(self._vocab, data, len(data), buffer, room, True, special)
        if n < 0:  # the buffer was too small: -n tokens are needed
            room = -n
            buffer = (_ll.llama_token * room)()
            n = _ll.llama_tokenize(self._vocab, data, len(data), buffer, room, True, special)
        return list(buffer[:n])

    def open(self, capacity: int | None = None) -> LlamaCppBackend:
        """A fresh, empty set of rows with room for `capacity` KV cells in all (default: the training context)."""
        return LlamaCppBackend(self, capacity if capacity is not None else self.context_length)

    def context(self, n_ctx: int) -> ctypes.c_void_p:
        """A context of `n_ctx` cells with empty caches: a finished backend's of that size, or a new one."""
        with self._idle_lock:
            for i in reversed(range(len(self._idle))):  # the most recently used first: its memory is warm
                if self._idle[i][0] == n_ctx:
                    return self._idle.pop(i)[1]
        params = _ll.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = min(_MAX_BATCH, n_ctx)
        params.n_ubatch = min(self.ubatch, params.n_batch)
        params.n_seq_max = _MAX_SEQ
        params.kv_unified = True  # rows share one pool of cells: the capacity is a total, not per row
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        ctx = _ll.llama_init_from_model(self._model, params)
        if not ctx:
            raise LinalignError(f"llama.cpp could not create a context of {n_ctx} cells for {self.path.name}")
        return ctx

    def recycle(self, n_ctx: int, ctx: ctypes.c_void_p) -> None:
        """Take back a finished backend's context, emptied, for the next `open` of that size."""
        if not self._model:
            _ll.llama_free(ctx)
            return
        _ll.llama_memory_clear(_ll.llama_get_memory(ctx), True)
        with self._idle_lock:
            self._idle.append((n_ctx, ctx))
            evicted = self._idle[:-_IDLE_CONTEXTS]
            del self._idle[:-_IDLE_CONTEXTS]
        for _, old in evicted:
            _ll.llama_free(old)

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for _, ctx in idle:
            _ll.llama_free(ctx)
        if self._model:
            _ll.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        if _ll is not None and getattr(self, "_model", None):
            self.close()


class _Batch:
    """A `llama_batch` whose arrays are numpy arrays, so a step fills them with vector writes, not a Python loop."""

    def __init__(self, size: int) -> None:
        self.token = np.zeros(size, np.int32)
        self.pos = np.zeros(size, np.int32)
        self.n_seq_id = np.ones(size, np.int32)
        self.seq = np.zeros(size, np.int32)
        self.logits = np.zeros(size, np.int8)
        self._one_each = self.seq.ctypes.data + 4 * np.arange(size, dtype=np.uintp)  # token i -> seq[i]
        self._shared = np.zeros(0, np.int32)  # the seq ids of tokens that belong to several sequences
        self.c = _ll.llama_batch()
        self.c.token = self.token.ctypes.data_as(ctypes.POINTER(_ll.llama_token))
        self.c.embd = None
        self.c.pos = self.pos.ctypes.data_as(ctypes.POINTER(_ll.llama_pos))
        self.c.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.c.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill(
        self, tokens: np.ndarray, pos: np.ndarray, seqs: np.ndarray | list[list[int]], want: np.ndarray | None
    ) -> None:
        """Write `n` tokens; `seqs` is one sequence per token, or for each token the list of its sequences."""
        n = len(tokens)
        self.token[:n], self.pos[:n] = tokens, pos
        self.logits[:n] = 1 if want is None else want
        if isinstance(seqs, np.ndarray):
            self.seq[:n], self.n_seq_id[:n] = seqs, 1
            self._point(self._one_each)
        else:
            counts = np.fromiter(map(len, seqs), np.int32, n)
            self._shared = np.fromiter(itertools.chain.from_iterable(seqs), np.int32, int(counts.sum()))
            self.n_seq_id[:n] = counts
            starts = (np.cumsum(counts) - counts).astype(np.uintp)
            self._point(self._shared.ctypes.data + 4 * starts)
        self.c.n_tokens = n

    def _point(self, addresses: np.ndarray) -> None:
        self._addresses = addresses  # kept alive while llama.cpp reads it
        self.c.seq_id = ctypes.cast(addresses.ctypes.data, ctypes.POINTER(ctypes.POINTER(_ll.llama_seq_id)))


def shared_prefixes(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[list[int]], list[int]]:
    """The tokens of `prompts` with every prefix that several share (a system prompt, a principle, copies of one
    prompt) once: per entry its token, position and the prompts that hold it, each prompt's positions in
    increasing order; and the entry of each prompt's last token.

    Sorted prompts share the most with their neighbour, so one pass over them builds the prefix tree.
    """
    tokens: list[int] = []
    positions: list[int] = []
    holders: list[list[int]] = []
    last = [0] * len(prompts)
    before: Sequence[int] = ()
    path: list[int] = []  # entries of the previous prompt's tokens
    for i in sorted(range(len(prompts)), key=lambda i: list(prompts[i])):
        prompt = prompts[i]
        common = next(
            (k for k, (a, b) in enumerate(zip(prompt, before, strict=False)) if a != b), min(len(prompt), len(before))
        )
        path = path[:common]
        for entry in path:
            holders[entry].append(i)
        for position in range(common, len(prompt)):
            path.append(len(tokens))
            tokens.append(prompt[position])
            positions.append(position)
            holders.append([i])
        last[i], before = path[-1], prompt
    return tokens, positions, holders, last


class LlamaCppBackend:
    """Rows of one llama.cpp context, advanced together (the `linalign.backends.Backend` protocol)."""

    def __init__(self, model: LlamaCppModel, capacity: int) -> None:
        if capacity < 1:
            raise LinalignError(f"the KV capacity must be at least one cell, got {capacity}")
        self.model = model
        # llama.cpp pads n_ctx to a multiple of 256 but sizes the batch and output buffers from the unpadded
        # value, which must hold a step of every possible row: pad first.
        self._padded = -(-capacity // _CTX_PAD) * _CTX_PAD
        ctx = model.context(self._padded)
        self._ctx = ctx
        self._memory = _ll.llama_get_memory(ctx)
        self.n_ctx: int = _ll.llama_n_ctx(ctx)
        self._batch = _Batch(_ll.llama_n_batch(ctx))
        self._seq = np.zeros(0, np.int32)  # llama.cpp sequence of each row
        self._len = np.zeros(0, np.int32)  # tokens held by each row (= next position)
        self._free = list(range(_MAX_SEQ - 1, -1, -1))  # unused seq ids, smallest last (popped first)
        self._dropped: list[int] = []  # seq ids of dropped rows whose cells are not yet released
        self._dropped_cells = 0

    @property
    def rows(self) -> int:
        return len(self._seq)

    @property
    def kv_capacity(self) -> int:
        """KV cells for all rows together: the decode loop admits sequences only while they fit."""
        return self.n_ctx

    @property
    def used(self) -> int:
        """KV cells held by all rows together."""
        return int(self._len.sum())

    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill `prompts` as new rows in as few `llama_decode` calls as the batch size allows; a prefix several
        of them share is computed once, its cells held by every sequence that has it (`shared_prefixes`)."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        self._release()
        self._check_room(lengths)
        seqs = np.array([self._free.pop() for _ in prompts], np.int32)
        tokens, positions, holders, last = shared_prefixes(prompts)
        want = np.zeros(len(tokens), np.int8)
        want[last] = 1
        owners = [[int(seqs[h]) for h in held] for held in holders]
        self._seq = np.concatenate([self._seq, seqs])
        self._len = np.concatenate([self._len, lengths])
        size = len(self._batch.token)
        out = [
            self._decode(
                np.array(tokens[i : i + size], np.int32),
                np.array(positions[i : i + size], np.int32),
                owners[i : i + size],
                want[i : i + size],
            )
            for i in range(0, len(tokens), size)
        ]
        if not out:
            return torch.zeros(0, self.model.vocab_size)
        row_of_entry = np.cumsum(want) - 1  # logits come back for the marked entries, in order
        return torch.cat(out)[torch.from_numpy(row_of_entry[last])]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to every row in one `llama_decode`; next-token logits of every row."""
        if len(tokens) != self.rows:
            raise ValueError(f"step needs one token per row: {self.rows} rows, {len(tokens)} tokens")
        if not self.rows:
            return torch.zeros(0, self.model.vocab_size)
        if self.used + self._dropped_cells + self.rows > self.n_ctx:
            self._release()
        if self.used + self.rows > self.n_ctx:
            raise LinalignError(
                f"the sequences outgrew the {self.n_ctx} KV cells reserved for them; ask for a larger capacity"
            )
        if self.rows and self._len.max() >= self.model.context_length:
            raise LinalignError(f"a sequence reached the model's context of {self.model.context_length} tokens")
        pos = self._len.copy()
        self._len += 1
        return self._decode(tokens.numpy(), pos, self._seq, None)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every other row; their cells and sequence ids return to the pool.

        The cells are released lazily, at the next `add` or when a step needs the room. llama.cpp sums attention
        over cells in cell order, and on quantised models a reordered sum moves logits by up to ~1: while rows
        only finish, the survivors' new tokens keep landing after their old ones, so their logits stay exactly
        those of a batch without the dropped rows.
        """
        keep = np.zeros(self.rows, bool)
        keep[torch.as_tensor(rows, dtype=torch.long).numpy()] = True
        self._dropped += self._seq[~keep].tolist()
        self._dropped_cells += int(self._len[~keep].sum())
        self._seq, self._len = self._seq[keep], self._len[keep]

    def _release(self) -> None:
        for seq in self._dropped:
            _ll.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._free += self._dropped
        self._dropped, self._dropped_cells = [], 0

    def _check_room(self, lengths: np.ndarray) -> None:
        if len(lengths) and lengths.min() < 1:
            raise LinalignError("a prompt has no tokens")
        if len(lengths) > len(self._free):
            raise LinalignError(f"llama.cpp holds at most {_MAX_SEQ} rows at once; use smaller batches")
        longest = int(lengths.max()) if len(lengths) else 0
        if longest > self.model.context_length:
            raise LinalignError(
                f"a prompt of {longest} tokens does not fit the model's context of {self.model.context_length}"
            )
        if self.used + int(lengths.sum()) > self.n_ctx:
            raise LinalignError(
                f"prompts of {int(lengths.sum())} tokens do not fit the {self.n_ctx - self.used} free KV cells "
                f"(of {self.n_ctx}); ask for a larger capacity"
            )

    def _decode(
        self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray | list[list[int]], want: np.ndarray | None
    ) -> torch.Tensor:
        """One `llama_decode` of up to n_batch tokens; float32 logits of the positions marked in `want`."""
        n = len(tokens)
        self._batch.fill(tokens, pos, seq, want)
        status = _ll.llama_decode(self._ctx, self._batch.c)
        if status != 0:
            raise LinalignError(f"llama.cpp could not decode the batch (status {status}: no room in the KV cache?)")
        n_out = n if want is None else int(want.sum())
        if n_out == 0:
            return torch.zeros(0, self.model.vocab_size)
        view = np.ctypeslib.as_array(_ll.llama_get_logits(self._ctx), shape=(n_out, self.model.vocab_size))
        return torch.from_numpy(view.copy())  # llama.cpp reuses the buffer at the next decode

    def close(self) -> None:
        """Hand the context back to the model for reuse (its caches emptied)."""
        if self._ctx:
            self.model.recycle(self._padded, self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        if _ll is not None and getattr(self, "_ctx", None):
            self.close()
