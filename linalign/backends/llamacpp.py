"""The llama.cpp backend: GGUF models run by `llama-cpp-python`'s low-level API, every row a llama.cpp sequence.

Each row of the decode loop is one llama.cpp sequence (`seq_id`) with its own KV cells in one unified cache, so one
`llama_decode` advances every context of every sequence together — one read of the weights per step, which is what
makes the second context of Linear Alignment cheap. Prefill of new rows is batched the same way, with logits
requested only at each row's last position, and a prefix several new rows share (a system prompt, a principle,
copies of one prompt) enters the batch once, its cells held by every one of them: fewer tokens to prefill, and
cheaper steps after, since every row's attention runs over all the cells in use. Dropped rows give their cells and
their `seq_id` back, and a closed (or collected) backend gives its context back to the model, emptied, for the next
one of that size: creating a context costs ~40 ms, a fifth of a 48-token reply's decoding on the built-in model.

Every row's logits are those of the row decoded alone, bit for bit, whatever else shares its passes (batch
invariance): llama.cpp's attention, with flash attention on, sums over a row's own cells in cell order and skips
every other cell, and three rules keep that sum the same in any company (`LlamaCppModel`'s docstring says why each
is needed): passes are cut to at most `ubatch` (32) tokens, so every pass takes the kernel a decode step takes;
a pass never holds a single token while the cache is large (a one-row step gets a throwaway ghost row), since a
lone query takes a kernel that splits its sum across threads; and a row's new tokens always land after its old
ones in the cache: dropped rows' cells are not handed out again while other rows live, but all at once when the
last row goes, or, when the cache runs out of room, by compaction — the live rows' tokens prefilled again, in
order, into the emptied cache.

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
from collections import Counter
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
_GHOST = _MAX_SEQ - 1  # the sequence of the throwaway row that keeps one-row passes at two tokens
_UBATCH = 32  # tokens per pass: under llama.cpp's 64, from which attention takes a tiled kernel
_SPLIT_KV_FROM = 512  # cells in view from which a single-token pass splits its attention sum across threads
_KV_PAD = 256  # llama.cpp pads the cells in view to a multiple of this
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
    """A GGUF model loaded once; `open` gives independent sets of rows (contexts) over its weights (the
    `linalign.backends.Runner` protocol).

    `threads` defaults to the physical cores. `ubatch` is the most tokens llama.cpp computes in one pass. The
    defaults make every row's logits independent of what shares its passes (see the module docstring), measured
    on the built-in model:

    - llama.cpp's CPU attention takes a tiled kernel from 64 query tokens in a pass: the same prompt prefilled
      alone and beside another differs by up to 0.69 in its first logits with 512-token passes, by 0 with 32;
    - a pass of one token with 512 or more cells in view splits the attention sum across threads: a one-row step
      differs from the same row's step beside another by up to 0.71;
    - with flash attention off, the attention sums run over every cell of the cache, the other rows' included,
      so a row's logits depend on where its cells lie (flash attention on, llama.cpp's CPU default, skips them;
      off, as `llama_cpp.Llama` sets it, the first logits differ from it by up to 0.43).

    A `ubatch` of 64 or more prefills faster but gives up that invariance.
    """

    name = "llamacpp"

    def __init__(self, path: str | os.PathLike[str], *, threads: int | None = None, ubatch: int = _UBATCH) -> None:
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

    def open(self, capacity: int | None = None, compile: bool = False) -> LlamaCppBackend:
        """A fresh, empty set of rows with room for `capacity` KV cells in all (default: the training context)."""
        if compile:
            raise LinalignError("--compile applies to the transformers backend; llama.cpp runs compiled code")
        return LlamaCppBackend(self, capacity if capacity is not None else self.context_length)

    def context(self, n_ctx: int) -> ctypes.c_void_p:
        """A context of `n_ctx` cells with empty caches: a finished backend's of that size, or a new one."""
        with self._idle_lock:
            for i in reversed(range(len(self._idle))):  # the most recently used first: its memory is warm
                if self._idle[i][0] == n_ctx:
                    return self._idle.pop(i)[1]
        params = _ll.llama_context_default_params()
        params.n_ctx = n_ctx
        # `LlamaCppBackend` cuts the passes itself; the batch size only sizes the output buffers, which llama.cpp
        # wants to hold a token of every sequence.
        params.n_batch = min(max(self.ubatch, _MAX_SEQ), n_ctx)
        params.n_ubatch = min(self.ubatch, params.n_batch)
        params.n_seq_max = _MAX_SEQ
        params.kv_unified = True  # rows share one pool of cells: the capacity is a total, not per row
        params.flash_attn_type = _ll.LLAMA_FLASH_ATTN_TYPE_ENABLED  # attention over a row's own cells only
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


def passes(n: int, most: int) -> list[int]:
    """Sizes of the passes that compute `n` tokens, at most `most` each and as even as can be, so that no pass
    holds a single token unless `n` is one."""
    count = -(-n // most)
    return [n // count + (i < n % count) for i in range(count)]


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


class LlamaCppPrefill:
    """Rows to come of a `LlamaCppBackend` (the `linalign.backends.Prefill` protocol): the entries of their prompts
    (`shared_prefixes`) computed in order, a chunk at a time, into the cells of their own sequences. However the
    chunks fall, every row's cells hold its tokens in order, so its logits are those of a prefill in one go."""

    def __init__(self, backend: LlamaCppBackend, prompts: Sequence[Sequence[int]], seqs: np.ndarray) -> None:
        self.backend, self.prompts, self.seqs = backend, [list(p) for p in prompts], seqs
        self.tokens, self.positions, self.holders, self.last = shared_prefixes(self.prompts)
        self.done = 0  # entries computed
        self._logits: dict[int, torch.Tensor] = {}  # entry -> the next-token logits after it, for prompts' last

    @property
    def left(self) -> int:
        return len(self.tokens) - self.done

    def run(self, tokens: int) -> int:
        start = self.done
        end = min(len(self.tokens), start + max(1, tokens))
        self.backend._room(end - start)  # first: compaction gives the rows to come new sequences
        ends = sorted({e for e in self.last if start <= e < end})
        want = np.zeros(end - start, np.int8)
        want[[e - start for e in ends]] = 1
        owners = [[int(self.seqs[h]) for h in held] for held in self.holders[start:end]]
        logits = self.backend._compute(self.tokens[start:end], self.positions[start:end], owners, want)
        self._logits.update(zip(ends, logits, strict=True))
        self.done = end
        return end - start

    def computed(self) -> list[list[int]]:
        """Each prompt's tokens computed so far: a prefix of it, since its entries come in the order of its
        positions."""
        counts = Counter(h for held in self.holders[: self.done] for h in held)
        return [p[: counts[i]] for i, p in enumerate(self.prompts)]

    def join(self) -> torch.Tensor:
        if self.left:
            raise RuntimeError(f"{self.left} prompt tokens are still to prefill")
        backend = self.backend
        backend._coming.remove(self)
        backend._seq = np.concatenate([backend._seq, self.seqs])
        backend._len = np.concatenate([backend._len, np.array([len(p) for p in self.prompts], np.int32)])
        backend._history += self.prompts
        if not self.last:
            return torch.zeros(0, backend.model.vocab_size)
        return torch.stack([self._logits[e] for e in self.last])

    def cancel(self) -> None:
        backend = self.backend
        backend._coming.remove(self)
        backend._dropped += self.seqs.tolist()
        backend._clear_if_idle()


class LlamaCppBackend:
    """Rows of one llama.cpp context, advanced together (the `linalign.backends.Backend` protocol)."""

    can_merge = True  # sequences of one context are independent: rows join and leave at any step
    can_drop = True
    chunked_prefill = True  # a bounded number of tokens a pass (`LlamaCppPrefill`)

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
        self._pass = _ll.llama_n_ubatch(ctx)
        self._batch = _Batch(_ll.llama_n_batch(ctx))
        self._seq = np.zeros(0, np.int32)  # llama.cpp sequence of each row
        self._len = np.zeros(0, np.int32)  # tokens held by each row (= next position)
        self._history: list[list[int]] = []  # each row's tokens, to prefill them again when the cache is compacted
        self._coming: list[LlamaCppPrefill] = []  # rows to come, their prompts being prefilled
        self._clear()

    def _clear(self) -> None:
        """Empty the cache: every cell and sequence id free, no ghost."""
        _ll.llama_memory_clear(self._memory, False)
        self._free = [s for s in range(_MAX_SEQ - 1, -1, -1) if s != _GHOST]  # smallest last (popped first)
        self._dropped: list[int] = []  # seq ids of dropped rows, their cells still held
        self._filled = 0  # cells handed out since the cache was emptied: none is ever handed out twice
        self._ghost = 0  # tokens of the ghost row

    @property
    def rows(self) -> int:
        return len(self._seq)

    @property
    def kv_capacity(self) -> int:
        """KV cells for all rows together: the decode loop admits sequences only while they fit."""
        return self.n_ctx

    @property
    def used(self) -> int:
        """KV cells held by all rows together, and reserved by the prompts of rows to come."""
        return int(self._len.sum()) + sum(len(p) for coming in self._coming for p in coming.prompts)

    def add(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prefill `prompts` as new rows in one go (`prefill`, run to the end, joined)."""
        coming = self.prefill(prompts)
        coming.run(coming.left)
        return coming.join()

    def prefill(self, prompts: Sequence[Sequence[int]]) -> LlamaCppPrefill:
        """Rows to come, computed a chunk at a time between steps; a prefix several of them share is computed
        once, its cells held by every sequence that has it (`shared_prefixes`). Their cells are reserved now."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        self._check_room(lengths)
        if len(prompts) > len(self._free):
            self._compact()
        coming = LlamaCppPrefill(self, prompts, np.array([self._free.pop() for _ in prompts], np.int32))
        self._coming.append(coming)
        return coming

    def _compute(
        self, tokens: list[int], positions: list[int], owners: list[list[int]], want: np.ndarray
    ) -> torch.Tensor:
        """Compute prefill entries in passes of at most `ubatch` tokens; the logits of the entries marked in
        `want`, in order (the room for them made first: `_room`)."""
        out, start = [torch.zeros(0, self.model.vocab_size)], 0
        for size in passes(len(tokens), self._pass):
            end = start + size
            out.append(
                self._decode(
                    np.array(tokens[start:end], np.int32),
                    np.array(positions[start:end], np.int32),
                    owners[start:end],
                    want[start:end],
                )
            )
            start = end
        return torch.cat(out)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to every row; next-token logits of every row."""
        if len(tokens) != self.rows:
            raise ValueError(f"step needs one token per row: {self.rows} rows, {len(tokens)} tokens")
        if not self.rows:
            return torch.zeros(0, self.model.vocab_size)
        if self.used + self.rows > self.n_ctx:
            raise LinalignError(
                f"the sequences outgrew the {self.n_ctx} KV cells reserved for them; ask for a larger capacity"
            )
        if self._len.max() >= self.model.context_length:
            raise LinalignError(f"a sequence reached the model's context of {self.model.context_length} tokens")
        self._room(self.rows)
        new = tokens.numpy().astype(np.int32)
        for history, token in zip(self._history, new.tolist(), strict=True):
            history.append(token)
        pos = self._len.copy()
        self._len += 1
        out, start = [], 0
        for size in passes(self.rows, self._pass):
            end = start + size
            out.append(self._decode(new[start:end], pos[start:end], self._seq[start:end], None))
            start = end
        return out[0] if len(out) == 1 else torch.cat(out)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every other row. Their cells are not handed out again while other rows live (see the module
        docstring): all are freed when the last row goes, or by compaction when the cache needs the room."""
        keep = np.zeros(self.rows, bool)
        keep[torch.as_tensor(rows, dtype=torch.long).numpy()] = True
        self._dropped += self._seq[~keep].tolist()
        self._seq, self._len = self._seq[keep], self._len[keep]
        self._history = [h for h, k in zip(self._history, keep.tolist(), strict=True) if k]
        self._clear_if_idle()

    def _clear_if_idle(self) -> None:
        if not self.rows and not self._coming:
            self._clear()

    def _room(self, tokens: int) -> None:
        """Compact the cache if `tokens` more cells (and a ghost's) would not fit after the cells handed out."""
        if self._filled + tokens + 1 > self.n_ctx:
            self._compact()

    def _compact(self) -> None:
        """Free the dropped rows' cells by prefilling the live rows again, in order, into the emptied cache, with
        what the rows to come have computed so far: bit for bit the cells they had, and every row's cells in the
        order of its tokens."""
        log.debug("compacting: %d live rows, %d cells handed out of %d", self.rows, self._filled, self.n_ctx)
        histories, lengths = self._history, self._len
        self._clear()
        self._seq = np.array([self._free.pop() for _ in histories], np.int32)
        self._len = lengths
        seqs, rows = self._seq.tolist(), list(histories)
        for coming in self._coming:
            coming.seqs = np.array([self._free.pop() for _ in coming.prompts], np.int32)
            for seq, part in zip(coming.seqs.tolist(), coming.computed(), strict=True):
                if part:
                    seqs.append(seq)
                    rows.append(part)
        tokens, positions, holders, _ = shared_prefixes(rows)
        # No logits: the live rows' are in the decode loop's hands, the rows to come's are kept by them.
        self._compute(tokens, positions, [[seqs[h] for h in held] for held in holders], np.zeros(len(tokens), np.int8))

    def _check_room(self, lengths: np.ndarray) -> None:
        if len(lengths) and lengths.min() < 1:
            raise LinalignError("a prompt has no tokens")
        if len(lengths) + self.rows + sum(len(c.prompts) for c in self._coming) > _MAX_SEQ - 1:
            raise LinalignError(f"llama.cpp holds at most {_MAX_SEQ - 1} rows at once; use smaller batches")
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
        """One `llama_decode` of one pass; float32 logits of the positions marked in `want` (all if None)."""
        n = len(tokens)
        n_out = n if want is None else int(want.sum())
        if n == 1 and self._ghost_needed():
            tokens, pos, seq, want = self._with_ghost(tokens, pos, seq, want)
        self._batch.fill(tokens, pos, seq, want)
        status = _ll.llama_decode(self._ctx, self._batch.c)
        if status != 0:
            raise LinalignError(f"llama.cpp could not decode the batch (status {status}: no room in the KV cache?)")
        self._filled += len(tokens)
        if n_out == 0:
            return torch.zeros(0, self.model.vocab_size)
        view = np.ctypeslib.as_array(_ll.llama_get_logits(self._ctx), shape=(n_out, self.model.vocab_size))
        return torch.from_numpy(view.copy())  # llama.cpp reuses the buffer at the next decode

    def _ghost_needed(self) -> bool:
        """Whether a single-token pass now could see 512 cells or more (`LlamaCppModel`'s docstring)."""
        filled = self._filled + 2
        return self.n_ctx >= _SPLIT_KV_FROM and _SPLIT_KV_FROM - _KV_PAD < filled <= self.n_ctx

    def _with_ghost(self, tokens: np.ndarray, pos: np.ndarray, seq, want: np.ndarray | None) -> tuple:
        """The pass with the ghost row's next token after the real one: two tokens, the one-chunk kernel. The
        ghost's cells are never read by any other row, and go with the next emptying of the cache."""
        ghost_seq = [[_GHOST]] if isinstance(seq, list) else np.array([_GHOST], np.int32)
        seqs = seq + ghost_seq if isinstance(seq, list) else np.concatenate([seq, ghost_seq])
        wanted = np.array([1 if want is None else want[0], 0], np.int8)
        self._ghost += 1
        return np.append(tokens, tokens[0]), np.append(pos, self._ghost - 1), seqs, wanted

    def close(self) -> None:
        """Hand the context back to the model for reuse (its caches emptied)."""
        if self._ctx:
            self.model.recycle(self._padded, self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        if _ll is not None and getattr(self, "_ctx", None):
            self.close()
