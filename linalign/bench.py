"""Throughput and memory of Linear Alignment against plain decoding and its peers, measured in one run.

Every method decodes the same prompts to the same forced length (greedy, `min_new_tokens` =
`max_new_tokens`), so tokens/s compare like for like:

1. `generate`        plain `transformers` generate on the principled prompt (the floor)
2. `linalign`        linalign's fused Linear Alignment (both contexts in one forward pass)
3. `linalign-plain`  linalign's own plain decoding of the principled prompt (same kernels as 2)
4. `hf-cfg`          `generate(guidance_scale=1+r, negative_prompt_ids=...)`, the library peer
5. `two-pass`        two separate cached forward passes per token, as the reference code does

Where the model is a `.gguf` file and llama.cpp is installed, also `llama.cpp` (llama.cpp's own plain greedy
decoding through its high-level API, one prompt at a time), `linalign-llamacpp` and `linalign-plain-llamacpp`
(2 and 3 on the llama.cpp backend).

With `options` (quality options of `AlignConfig`, e.g. `{"repeat_guard": 4}`), also 2 with them:
`linalign-options` (and `linalign-options-llamacpp`), to price an option against the paper's step in one run.

With `compile=True`, also 2 and 3 on the compiled, static-cache path (`linalign.backends.compiled`):
`linalign-compiled` and `linalign-plain-compiled`; their first run (the compilation) is timed apart, as
`compile_seconds`. `random_init=NAME` measures a model of a shipped config's shape with random weights
(`linalign.random_init`), so real sizes can be measured offline; the report says `"weights": "random"`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from linalign.backends.transformers import TransformersBackend, left_padded
from linalign.compute import on_compute_thread
from linalign.config import AlignConfig, DecodeConfig
from linalign.engine import Aligner
from linalign.methods import make_plan
from linalign.models import LoadedModel, load_model, pick_backend, resolve
from linalign.prompts import build_ids
from linalign.step import Chain, Row, Step, term_weights

CPU = torch.device("cpu")
PRINCIPLE = "Answer in lowercase letters only. Never use capital letters."
PROMPTS = [
    "What is the capital of France?",
    "Give me two tips for better sleep.",
    "Name three famous scientists and what they discovered.",
    "How do I boil an egg?",
    "Explain photosynthesis to a child.",
    "What should I pack for a weekend at the beach?",
    "How can I save money on groceries?",
    "Why is the sky blue?",
]


@dataclass
class Measurement:
    method: str
    batch: int
    tokens_per_s: float
    peak_mb: float  # whole process (CPU) or allocator (CUDA) peak, weights included
    extra_mb: float  # above what was in use when the run started: caches and activations
    speed_vs_generate: float = 1.0
    memory_vs_generate: float = 1.0


class _PeakMemory:
    """Peak memory of one run: CUDA's allocator counter, or the process RSS sampled on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    @contextmanager
    def measure(self):
        result = {"peak": 0.0, "extra": 0.0}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield result
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            result.update(peak=peak / 2**20, extra=(peak - base) / 2**20)
            return
        base, peak, done = self._rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        yield result
        done.set()
        sampler.join()
        top = max(peak[0], self._rss())
        result.update(peak=top / 2**20, extra=max(0, top - base) / 2**20)


def _two_pass(model, principled, plain, ratio: float, steps: int, pad_id: int) -> None:
    """The reference code's structure: two contexts, two cached forward passes per token, the same chain."""
    contexts = [TransformersBackend(model, pad_id), TransformersBackend(model, pad_id)]
    logits = [c.add(ids) for c, ids in zip(contexts, (principled, plain), strict=True)]
    plan = make_plan(AlignConfig(method="la", principles=[PRINCIPLE], ratio=ratio, preset="paper"))
    chain = Chain(device=logits[0].device)
    chain.join([Row(plan, DecodeConfig()) for _ in principled])
    weights = term_weights(plan, len(principled), chain.device)
    for _ in range(steps):
        step = Step(chain, [(x, None, None, w) for x, w in zip(logits, weights, strict=False)], logits[0].float())
        chain.scores(step)
        tokens = chain.choose(step)
        chain.accept(tokens.tolist())
        logits = [c.step(tokens) for c in contexts]


def _llama_cpp_plain(llm, prompts: list[list[int]], steps: int) -> None:
    """llama.cpp's own plain greedy decoding (its high-level API, one prompt at a time, as people run it).
    `reset` first: `generate` would otherwise reuse the KV cache of a repeated prompt and skip its prefill."""
    for ids in prompts:
        llm.reset()
        for n, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), start=1):
            if n == steps:
                break


def _aligned_runs(aligner: Aligner, prompts: list[str], new_tokens: int, ratio: float, options: dict | None):
    """linalign's Linear Alignment (with `options` too, where given) and its plain decoding."""
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=ratio, preset="paper")
    prompting = AlignConfig(method="prompt", principles=[PRINCIPLE])
    config = DecodeConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    runs = {
        "linalign": lambda: aligner.generate(prompts, align, config),
        "linalign-plain": lambda: aligner.generate(prompts, prompting, config),
    }
    if options:
        shaped = replace(align, **options)
        runs["linalign-options"] = lambda: aligner.generate(prompts, shaped, config)
    return runs


def llama_step_ms(llama: Aligner, rows: int, steps: int = 32) -> float:
    """Milliseconds of one llama.cpp decode step of `rows` rows (best of three runs). Linear Alignment steps two
    rows a sequence where plain decoding steps one, so one row's time over two rows' bounds the speed it can
    reach against plain decoding on these weights and this machine, whatever linalign does around the step."""
    ids = build_ids(llama.tokenizer, PROMPTS[0], PRINCIPLE)
    tokens = torch.full((rows,), ids[-1])
    best = float("inf")
    for _ in range(3):
        backend = llama.main.runner.open(rows * (len(ids) + steps))
        backend.add([ids] * rows)
        start = time.perf_counter()
        for _ in range(steps):
            backend.step(tokens)
        best = min(best, (time.perf_counter() - start) / steps)
        backend.close()
    return best * 1000


def _best_seconds(aligner: Aligner, prompts: list[str], align: AlignConfig, new_tokens: int) -> float:
    config = DecodeConfig(new_tokens, min_new_tokens=new_tokens)
    return min(_timed(lambda: aligner.generate(prompts, align, config), CPU) for _ in range(2))


def invariance_cost(
    invariant: Aligner, stock: Aligner, batches: tuple[int, ...], new_tokens: int, ratio: float
) -> list[dict]:
    """What batch invariance costs: Linear Alignment's prefill and decode tokens/s with the batch-invariant
    configuration against the stock one, per batch size (best of two runs). Prefill counts the prompt tokens of
    both contexts; decode, the new tokens after the first."""
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=ratio, preset="paper")
    rows = []
    for batch in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        prompt_tokens = sum(len(ids) for p in invariant.prepare_batch(prompts, align) for ids in p.term_ids)
        row = {"batch": batch}
        for kind, aligner in (("invariant", invariant), ("stock", stock)):
            first, full = (_best_seconds(aligner, prompts, align, n) for n in (1, new_tokens))
            row[f"prefill_tokens_per_s_{kind}"] = round(prompt_tokens / first, 1)
            row[f"decode_tokens_per_s_{kind}"] = round(batch * (new_tokens - 1) / max(full - first, 1e-9), 1)
        rows.append(row)
    return rows


def llama_invariance_cost(llama: Aligner, batches: tuple[int, ...], new_tokens: int, ratio: float) -> list[dict]:
    """llama.cpp: the default 32-token passes (batch-invariant) against llama.cpp's usual 512-token passes."""
    from linalign.backends.llamacpp import LlamaCppModel

    runner = llama.main.runner
    fast = LlamaCppModel(runner.path, threads=runner.threads, ubatch=512)
    try:
        return invariance_cost(llama, Aligner(replace(llama.main, runner=fast)), batches, new_tokens, ratio)
    finally:
        fast.close()


def transformers_invariance_cost(
    loaded: LoadedModel, batches: tuple[int, ...], new_tokens: int, ratio: float
) -> list[dict]:
    """transformers: rows prefilled alone, chunked products and row-by-row attention in steps (the CPU default)
    against one padded batch."""
    invariant, stock = (Aligner(replace(loaded, batch_invariant=on)) for on in (True, False))
    return invariance_cost(invariant, stock, batches, new_tokens, ratio)


def _llama_runs(
    llama: Aligner, prompts: list[str], new_tokens: int, ratio: float, options: dict | None = None
) -> dict[str, Callable[[], object]]:
    """llama.cpp's own plain decoding and linalign's on the llama.cpp backend."""
    from llama_cpp import Llama

    principled = [build_ids(llama.tokenizer, p, PRINCIPLE) for p in prompts]
    runner = llama.main.runner
    llm = Llama(str(runner.path), n_ctx=2048, n_threads=runner.threads, verbose=False)
    runs = {"llama.cpp": lambda: _llama_cpp_plain(llm, principled, new_tokens)}
    return runs | {f"{k}-llamacpp": v for k, v in _aligned_runs(llama, prompts, new_tokens, ratio, options).items()}


def _runs(
    aligner: Aligner,
    prompts: list[str],
    new_tokens: int,
    ratio: float,
    compiled: Aligner | None = None,
    options: dict | None = None,
) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per method, all decoding `prompts` to exactly `new_tokens` tokens."""
    tok, hf, device = aligner.tokenizer, aligner.main.model, aligner.main.device
    pad = tok.pad_token_id
    principled = [build_ids(tok, p, PRINCIPLE) for p in prompts]
    plain = [build_ids(tok, p) for p in prompts]
    p_ids, p_mask, _ = left_padded(principled, pad, device)
    n_ids, n_mask, _ = left_padded(plain, pad, device)
    forced = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad}
    cfg = {"guidance_scale": 1 + ratio, "negative_prompt_ids": n_ids, "negative_prompt_attention_mask": n_mask}
    runs = {
        "generate": lambda: hf.generate(p_ids, attention_mask=p_mask, **forced),
        **_aligned_runs(aligner, prompts, new_tokens, ratio, options),
        "hf-cfg": lambda: hf.generate(p_ids, attention_mask=p_mask, **cfg, **forced),
        "two-pass": lambda: _two_pass(hf, principled, plain, ratio, new_tokens, pad),
    }
    if compiled is not None:
        runs |= {f"{k}-compiled": v for k, v in _aligned_runs(compiled, prompts, new_tokens, ratio, options).items()}
    return runs


def _load(model: str | None, random_init: str | None, device: str, dtype: str) -> LoadedModel:
    if random_init is None:
        return load_model(model, dtype=dtype, device=device)
    from linalign.random_init import random_init_model

    return random_init_model(random_init, dtype=dtype, device=device)


def _timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@on_compute_thread
def run_benchmark(
    model: str | None = None,
    batches: tuple[int, ...] = (1, 8),
    new_tokens: int = 128,
    ratio: float = 2.0,
    repeats: int = 2,
    device: str = "cpu",
    dtype: str = "float32",
    progress: Callable[[str], None] = lambda _: None,
    compile: bool = False,
    random_init: str | None = None,
    methods: tuple[str, ...] | None = None,
    options: dict | None = None,
) -> dict:
    """Measure every method (or those in `methods`; `generate` always) at every batch size; best of `repeats`
    runs each. Compiled methods run after all eager ones, so the static caches and CUDA graphs they keep do not
    count in the eager methods' memory."""
    start = time.perf_counter()
    loaded = _load(model, random_init, device, dtype)
    load_seconds = time.perf_counter() - start
    aligner = Aligner(loaded)
    compiled = Aligner(loaded, compile=True) if compile else None
    llama, llama_seconds = None, None
    if random_init is None and pick_backend("auto", resolve(model)) == "llamacpp":
        start = time.perf_counter()
        llama = Aligner(model, backend="llamacpp")
        llama_seconds = round(time.perf_counter() - start, 2)
    memory = _PeakMemory(loaded.device)
    best: dict[tuple[int, str], Measurement] = {}
    compile_seconds: dict[str, float] = {}
    for phase in ("eager", "compiled"):
        for batch in batches:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            runs = _runs(aligner, prompts, new_tokens, ratio, compiled, options)
            if llama is not None:
                runs |= _llama_runs(llama, prompts, new_tokens, ratio, options)
            runs = {
                k: v
                for k, v in runs.items()
                if k.endswith("compiled") == (phase == "compiled")
                and (methods is None or k in methods or k == "generate")
            }
            for name in ("linalign", "linalign-compiled", "linalign-plain-compiled"):  # warm-up; compilation
                if name in runs:
                    progress(f"batch {batch}: warming up {name}")
                    seconds = _timed(runs[name], loaded.device)
                    if name.endswith("compiled"):
                        compile_seconds[f"{name}@{batch}"] = round(seconds, 1)
            for _ in range(repeats):
                for name, run in runs.items():
                    progress(f"batch {batch}: {name}")
                    with memory.measure() as mem:
                        seconds = _timed(run, loaded.device)
                    _keep_best(best, Measurement(name, batch, batch * new_tokens / seconds, mem["peak"], mem["extra"]))
    results = sorted(best.values(), key=lambda m: m.batch)  # stable: methods stay in the order they ran
    for m in results:
        floor = best[(m.batch, "generate")]
        m.speed_vs_generate = m.tokens_per_s / floor.tokens_per_s
        m.memory_vs_generate = m.peak_mb / floor.peak_mb
    step_ms = {rows: round(llama_step_ms(llama, rows), 2) for rows in (1, 2)} if llama is not None else None
    invariance = {}
    if loaded.device.type == "cpu":  # elsewhere the transformers backend is not batch-invariant: nothing to price
        invariance["transformers"] = transformers_invariance_cost(loaded, batches, new_tokens, ratio)
    if llama is not None:
        invariance["llamacpp"] = llama_invariance_cost(llama, batches, new_tokens, ratio)
    return {
        "model": loaded.name,
        "weights": "random" if loaded.random_weights else "pretrained",
        "device": _device_name(loaded.device),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "ratio": ratio,
        "options": options or {},
        "model_load_seconds": round(load_seconds, 2),
        "llamacpp_load_seconds": llama_seconds,
        "llamacpp_step_ms": step_ms,  # one decode step of 1 and of 2 rows: Linear Alignment's bound is the ratio
        "invariance": invariance,  # per backend: the batch-invariant configuration vs the stock one
        "compile_seconds": compile_seconds,  # first run of each compiled method: compilation and one decode
        "results": [asdict(m) for m in results],
    }


def _keep_best(best: dict[tuple[int, str], Measurement], m: Measurement) -> None:
    """The fastest run's speed; the largest peak memory of any run."""
    old = best.get((m.batch, m.method))
    if old is not None:
        m.peak_mb, m.extra_mb = max(old.peak_mb, m.peak_mb), max(old.extra_mb, m.extra_mb)
        m.tokens_per_s = max(m.tokens_per_s, old.tokens_per_s)
    best[(m.batch, m.method)] = m


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
