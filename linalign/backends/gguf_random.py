"""Llama-shaped GGUF files with random weights, written on demand for speed measurements.

No model hub is reachable here and the one real chat model is 135M parameters, where a decode step is bound by
compute. A >= 1B-parameter model is bound by reading its weights, the regime where a second context per sequence
should come almost free; random weights give that model's speed (never its text) without shipping gigabytes.
The tokenizer metadata is copied from the built-in GGUF, so the vocabulary and chat template are real.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

_Q8_BLOCK = 32  # weights per Q8_0 block: one float16 scale, then 32 int8
_WEIGHT_STD = 0.02
_INT8_STD = 74.0  # standard deviation of uniformly random int8 values


def random_llama_gguf(
    path: str | os.PathLike[str],
    hidden: int = 2048,
    layers: int = 16,
    *,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    context: int = 8192,
    dtype: str = "q8_0",
    tokenizer_from: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write (unless it already exists) a random Llama GGUF at `path`; return the path.

    The defaults are Llama-3.2-1B's shape over SmolLM2's 49k vocabulary: ~1.2B parameters, ~1.3 GB in Q8_0.
    `dtype` is `q8_0` or `f16`. The file name should carry the shape: an existing file is reused as it is.
    """
    path = Path(path)
    if path.exists():
        return path
    if dtype not in ("q8_0", "f16"):
        raise ValueError(f"dtype must be 'q8_0' or 'f16', got {dtype!r}")
    heads = heads or max(1, hidden // 64)
    kv_heads = kv_heads or max(1, heads // 4)
    ffn = ffn or 4 * hidden
    source = gguf.GGUFReader(tokenizer_from or _builtin())
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    head_dim = hidden // heads

    writer_path = path.with_name(path.name + f".tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(writer_path, "llama")
    writer.add_name(f"random-llama-{hidden}x{layers}")
    writer.add_vocab_size(vocab)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if dtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)

    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
            f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
            f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
    # Header and tensor table first, then one tensor at a time: the weights never sit in memory together.
    for name, shape in shapes.items():
        stored, np_dtype, raw = _layout(shape, dtype)
        nbytes = int(np.prod(stored)) * np.dtype(np_dtype).itemsize
        writer.add_tensor_info(name, stored, np.dtype(np_dtype), nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for shape in shapes.values():
        writer.write_tensor_data(_tensor(rng, shape, dtype))
    writer.close()
    writer_path.rename(path)  # atomic: an interrupted write never leaves a truncated model behind
    return path


def _layout(shape: tuple[int, ...], dtype: str) -> tuple[tuple[int, ...], type, gguf.GGMLQuantizationType | None]:
    """How a tensor of `shape` is stored: its array shape, numpy type and raw GGML type (None: from numpy)."""
    if len(shape) == 1:
        return shape, np.float32, None
    if dtype == "f16":
        return shape, np.float16, None
    rows, cols = shape
    return (rows, cols // _Q8_BLOCK * (2 + _Q8_BLOCK)), np.uint8, gguf.GGMLQuantizationType.Q8_0


def _tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Random weights of `shape` (norm weights are ones), stored as `_layout` says."""
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    rows, cols = shape
    values = np.frombuffer(rng.bytes(rows * cols), np.int8).reshape(rows, cols)
    scale = _WEIGHT_STD / _INT8_STD
    if dtype == "f16":
        return values.astype(np.float16) * np.float16(scale)
    blocks = values.reshape(rows, cols // _Q8_BLOCK, _Q8_BLOCK).view(np.uint8)
    scales = np.full((rows, cols // _Q8_BLOCK, 1), scale, np.float16).view(np.uint8)
    return np.concatenate([scales, blocks], axis=2).reshape(rows, -1)


def _builtin() -> Path:
    from linalign.models import builtin_gguf

    return builtin_gguf()
