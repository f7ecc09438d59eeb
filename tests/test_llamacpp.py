"""The llama.cpp backend against independent references: uncached evaluations, llama.cpp's own greedy decoding,
one prompt at a time, llama.cpp's own tokenizer; and the bookkeeping of its KV cells."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow  # runs the real built-in model (through llama.cpp)

from margins import assert_close_and_same_where_decided  # noqa: E402
from reference import authors_choice  # noqa: E402

from linalign.backends.gguf_random import random_llama_gguf  # noqa: E402
from linalign.backends.llamacpp import LlamaCppModel, shared_prefixes  # noqa: E402
from linalign.errors import LinalignError  # noqa: E402
from linalign.models import builtin_gguf  # noqa: E402
from linalign.prompts import build_ids, with_system  # noqa: E402

PRINCIPLE = "Answer in lowercase letters only. Never use capital letters."
QUESTIONS = [
    "What is the capital of France?",
    "Name three famous scientists.",
    "Why is the sky blue?",
    "Give me a tip for sleeping better.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model() -> LlamaCppModel:
    """Passes of at most 32 tokens: every attention runs llama.cpp's decode-step kernel, so the comparisons below
    are exact, token for token and bit for bit (from 64 tokens in a pass a tiled kernel moves logits by ~1).
    One thread: llama.cpp's workers spin at every barrier and crawl on a busy machine."""
    return LlamaCppModel(builtin_gguf(), ubatch=32, threads=1)


@pytest.fixture(scope="module")
def pairs(tokenizer) -> list[tuple[list[int], list[int]]]:
    return [(build_ids(tokenizer, q, PRINCIPLE), build_ids(tokenizer, q)) for q in QUESTIONS]


def la_cached(model: LlamaCppModel, pairs, ratio: float, n: int = NEW_TOKENS) -> list[list[int]]:
    """Linear Alignment on one backend: rows 2i / 2i+1 are prompt i with / without the principle; finished
    prompts leave the batch (their rows are dropped with `keep`)."""
    backend = model.open(sum(len(p) + len(q) + 2 * n for p, q in pairs))
    logits = backend.add([ids for pair in pairs for ids in pair])
    alive, out = list(range(len(pairs))), [[] for _ in pairs]
    for _ in range(n):
        chosen = authors_choice(logits[0::2], logits[1::2], ratio)
        for i, token in zip(alive, chosen.tolist(), strict=True):
            out[i].append(token)
        going = [j for j, token in enumerate(chosen.tolist()) if token not in model.eos_ids]
        if len(going) < len(alive):
            backend.keep(torch.tensor([2 * j + c for j in going for c in (0, 1)], dtype=torch.long))
            alive, chosen = [alive[j] for j in going], chosen[going]
        if not alive:
            break
        logits = backend.step(chosen.repeat_interleave(2))
    return out


def uncached_logits(model: LlamaCppModel, ids: list[int]) -> torch.Tensor:
    """Next-token logits of `ids` from a fresh backend: the whole sequence evaluated from scratch."""
    backend = model.open(len(ids))
    try:
        return backend.add([ids])[0]
    finally:
        backend.close()


def la_uncached(model: LlamaCppModel, principled: list[int], plain: list[int], ratio: float) -> list[int]:
    """The authors' reference loop: two separate uncached evaluations per token."""
    out: list[int] = []
    for _ in range(NEW_TOKENS):
        l_p, l_0 = uncached_logits(model, principled + out), uncached_logits(model, plain + out)
        token = int(authors_choice(l_p[None], l_0[None], ratio)[0])
        out.append(token)
        if token in model.eos_ids:
            break
    return out


def test_model_properties(model):
    assert model.vocab_size == 49152
    assert model.context_length == 8192
    assert model.device == torch.device("cpu")
    assert 2 in model.eos_ids  # <|im_end|>
    assert model.threads >= 1


@pytest.mark.parametrize("system", [None, "You are a pirate."])
def test_llama_tokenizer_matches_hugging_face(model, tokenizer, system):
    for question, principle in [(QUESTIONS[0], None), (QUESTIONS[1], PRINCIPLE), ("Hi!\nHow are you? 🙂", None)]:
        ids = build_ids(tokenizer, question, principle, system=system)
        messages = with_system([{"role": "user", "content": question}], system, principle)
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert model.tokenize(text) == ids


def test_linear_alignment_equals_uncached_reference(model, pairs):
    cached = la_cached(model, pairs[:2], ratio=2.0)
    for (principled, plain), tokens in zip(pairs[:2], cached, strict=True):
        assert tokens == la_uncached(model, principled, plain, ratio=2.0)


def test_ratio_zero_equals_llama_cpp_greedy(model, pairs):
    from llama_cpp import Llama

    # llama.cpp's own decoding with linalign's numerics (flash attention on, 32-token passes): the same kernels,
    # so the same tokens on any CPU. `Llama`'s defaults (flash attention off) differ by up to ~0.4 in the logits.
    llm = Llama(
        model_path=str(builtin_gguf()),
        n_ctx=512,
        n_batch=32,
        n_ubatch=32,
        flash_attn=True,
        n_threads=model.threads,
        verbose=False,
    )
    for principled, _ in pairs[:2]:
        ours = la_cached(model, [(principled, principled)], ratio=0.0)[0]
        theirs = []
        for token in llm.generate(principled, top_k=1, temp=0.0, reset=True):
            theirs.append(token)
            if token in model.eos_ids or len(theirs) == NEW_TOKENS:
                break
        assert ours == theirs


def test_batched_equals_one_at_a_time(model, pairs):
    together = la_cached(model, pairs, ratio=2.0)
    assert together == [la_cached(model, [pair], ratio=2.0)[0] for pair in pairs]


def test_batched_logits_equal_single_rows(model, pairs):
    backend = model.open(sum(len(p) + len(q) for p, q in pairs))
    together = backend.add([ids for pair in pairs for ids in pair])
    alone = torch.stack([uncached_logits(model, ids) for pair in pairs for ids in pair])
    assert torch.equal(together, alone)


def test_shared_prefixes_enter_the_batch_once():
    prompts = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 4], [1, 2], [7]]
    tokens, positions, holders, last = shared_prefixes(prompts)
    assert len(tokens) == 6  # (1) (1 2) (1 2 3) (1 2 3 4) (1 2 5) (7)
    for i, prompt in enumerate(prompts):
        mine = [e for e in range(len(tokens)) if i in holders[e]]  # in batch order
        assert [tokens[e] for e in mine] == prompt
        assert [positions[e] for e in mine] == list(range(len(prompt)))
        assert last[i] == mine[-1]
    assert last[0] == last[2]


def test_copies_and_prefixes_of_other_prompts_decode_as_if_alone(model, pairs):
    """Identical prompts and a prompt that is the start of another share cells, then part on their own tokens."""
    (principled, plain), (other, _) = pairs[0], pairs[1]
    prompts = [principled, plain, principled, principled[:-3], other, plain]
    nexts = torch.tensor([10, 11, 12, 13, 14, 15])
    backend = model.open(sum(map(len, prompts)) + 2 * len(prompts))
    together = [backend.add(prompts), backend.step(nexts), backend.step(nexts + 1)]
    for i, ids in enumerate(prompts):
        alone = model.open(len(ids) + 2)
        expected = [alone.add([ids]), alone.step(nexts[i : i + 1]), alone.step(nexts[i : i + 1] + 1)]
        alone.close()
        for shared, own in zip(together, expected, strict=True):
            assert torch.equal(shared[i], own[0])


def test_the_benchmark_times_steps_of_one_and_two_rows(monkeypatch):
    from linalign import Aligner
    from linalign.backends.llamacpp import LlamaCppBackend
    from linalign.bench import llama_step_ms

    rows: list[int] = []
    step = LlamaCppBackend.step
    monkeypatch.setattr(LlamaCppBackend, "step", lambda self, tokens: rows.append(len(tokens)) or step(self, tokens))
    llama = Aligner(backend="llamacpp")
    assert llama_step_ms(llama, 1, steps=2) > 0 and rows == [1] * 6
    rows.clear()
    assert llama_step_ms(llama, 2, steps=2) > 0 and rows == [2] * 6


def test_the_benchmark_prices_batch_invariance_against_large_passes():
    from linalign import Aligner
    from linalign.bench import llama_invariance_cost

    rows = llama_invariance_cost(Aligner(backend="llamacpp"), (1, 2), new_tokens=3, ratio=2.0)
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert row[f"{key}_invariant"] > 0 and row[f"{key}_stock"] > 0


def test_large_passes_change_logits_only_by_kernel_noise(model, pairs):
    """512-token passes prefill with llama.cpp's tiled attention kernel, another kernel than the default's: close,
    and the same tokens wherever the default's logits decide by more than the difference."""
    fast = LlamaCppModel(builtin_gguf(), threads=1, ubatch=512)
    ids = [ids for pair in pairs for ids in pair]
    tiled = fast.open(sum(map(len, ids))).add(ids)
    exact = model.open(sum(map(len, ids))).add(ids)
    assert_close_and_same_where_decided(exact, tiled, tolerance=2.0)


def test_keep_frees_cells_for_a_long_run(model, pairs):
    principled, plain = pairs[0]
    backend = model.open(2 * (len(principled) + 4))  # room for one prompt pair at a time, never four
    assert backend.n_ctx < 4 * (len(principled) + len(plain) + 8)
    first = None
    for cycle in range(12):
        logits = backend.add([principled, plain])
        for _ in range(4):
            token = logits[0].argmax()
            logits = backend.step(torch.stack([token, token]))
        first = first if first is not None else logits
        assert torch.equal(logits, first)  # freed cells leave nothing the next rows could see
        backend.keep(torch.tensor([], dtype=torch.long))
        assert backend.rows == 0 and backend.used == 0, cycle


def test_keep_keeps_the_right_rows(model, pairs):
    (p0, q0), (p1, q1) = pairs[:2]
    backend = model.open(len(p0) + len(q0) + len(p1) + len(q1) + 8)
    backend.add([p0, q0, p1, q1])
    backend.keep(torch.tensor([1, 2]))
    token = torch.tensor([42, 42])
    kept = backend.step(token)
    assert torch.equal(kept[0], uncached_logits(model, q0 + [42]))
    assert torch.equal(kept[1], uncached_logits(model, p1 + [42]))
    again = backend.add([p0])  # reuses a freed sequence id
    assert torch.equal(again[0], uncached_logits(model, p0))


def test_rows_after_dropped_rows_and_new_ones_equal_uncached_logits(model, pairs):
    """Dropped rows' cells are not handed out again while others live, so new rows and the survivors' new tokens
    never land between a survivor's cells: its attention sum keeps its order, bit for bit."""
    (p0, q0), (p1, q1), (p2, _) = pairs[:3]
    backend = model.open(256)
    backend.add([p0, q0, p1, q1])
    backend.keep(torch.tensor([2, 3]))
    backend.add([p2])
    logits = backend.step(torch.tensor([13, 13, 13]))[:2]
    histories = [p1 + [13], q1 + [13]]
    for _ in range(6):
        chosen = logits.argmax(dim=-1)
        histories = [h + [int(t)] for h, t in zip(histories, chosen, strict=True)]
        logits = backend.step(torch.cat([chosen, chosen[:1]]))[:2]
    reference = torch.stack([uncached_logits(model, h) for h in histories])
    assert torch.equal(logits, reference)


def test_prompts_prefilled_in_chunks_between_steps_equal_them_in_one_go(model, pairs, monkeypatch):
    """Rows to come, computed seven tokens at a time while other rows step, leave and join, another prefill is
    given up half done and the cache runs out of room (compaction): their logits, then and after a step, are bit for bit
    those of a prefill in one go."""
    first, second = pairs[0][0] + pairs[2][1], pairs[2][0] + pairs[3][1]
    prompts = [first, second[:40], first[:-3]]  # the third a prefix of the first: shared cells
    solo = model.open(512)
    expected = solo.add(prompts)
    compactions = []
    compact = type(solo)._compact
    monkeypatch.setattr(type(solo), "_compact", lambda self: compactions.append(self.rows) or compact(self))
    busy = model.open(256)
    busy.add([pairs[1][0]])
    coming, given_up = busy.prefill(prompts), busy.prefill([pairs[3][0][:20]])
    given_up.run(12)
    chunks = 0
    while coming.left:
        assert coming.run(7) <= 7
        for _ in range(3):
            busy.step(torch.tensor([11] * busy.rows))
        chunks += 1
        if chunks == 2:
            given_up.cancel()
        if chunks % 3 == 0:  # the other row leaves and another joins: cells used once each, till compaction
            busy.keep(torch.tensor([], dtype=torch.long))
            busy.add([pairs[1][1]])
    assert compactions and chunks > 6
    assert torch.equal(coming.join(), expected)
    assert torch.equal(busy.step(torch.tensor([11, 5, 6, 7]))[1:], solo.step(torch.tensor([5, 6, 7])))


def test_a_closed_backends_context_is_reused_with_empty_caches(model, pairs):
    p, q = pairs[0]
    first = model.open(256)
    ctx, logits = first._ctx, first.add([p, q])
    first.step(logits.argmax(dim=-1))
    first.close()
    second = model.open(200)  # the same padded size: the same context, with nothing left of the first rows
    assert second._ctx is ctx and second.used == 0
    assert torch.equal(second.add([p, q]), logits)
    assert model.open(600)._ctx is not ctx  # another size gets its own
    backends = [model.open(256) for _ in range(6)]
    for b in backends:
        b.close()
    assert len(model._idle) <= 4  # the model keeps a few, and frees the rest


def test_prompts_that_do_not_fit_raise(model, pairs):
    principled, _ = pairs[0]
    backend = model.open(256)  # llama.cpp rounds n_ctx up to a multiple of 256
    with pytest.raises(LinalignError, match="do not fit"):
        backend.add([principled * 20])
    with pytest.raises(LinalignError, match="no tokens"):
        backend.add([[]])
    backend.add([[1] * 255])
    backend.step(torch.tensor([1]))
    with pytest.raises(LinalignError, match="outgrew"):
        backend.step(torch.tensor([1]))
    assert model.open(3000).n_ctx >= 3000  # sized from the request, not a fixed default


def test_random_gguf_loads_and_decodes(tmp_path, tokenizer):
    path = random_llama_gguf(tmp_path / "tiny.gguf", hidden=64, layers=2)
    tiny = LlamaCppModel(path)
    assert tiny.vocab_size == 49152 and tiny.context_length == 8192
    ids = build_ids(tokenizer, QUESTIONS[0])
    assert tiny.tokenize(tokenizer.decode(ids)) == ids  # the copied vocabulary is the built-in one
    backend = tiny.open(2 * len(ids) + 4)
    logits = backend.add([ids, ids])
    logits = backend.step(logits.argmax(dim=-1))
    assert logits.shape == (2, 49152) and torch.isfinite(logits).all()
    assert torch.allclose(logits[0], logits[1], atol=1e-3)


def test_sequences_that_outgrow_the_cache_end_early_and_the_rest_decode_on(model, tokenizer):
    from linalign import AlignConfig, Aligner, DecodeConfig
    from linalign.models import LoadedModel

    aligner = Aligner(LoadedModel(model=None, tokenizer=tokenizer, name="smollm2", runner=model))
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    config = DecodeConfig(max_new_tokens=200, min_new_tokens=200)
    first, second = (aligner.prepare(q, align, config) for q in QUESTIONS[:2])
    decoder = aligner.decoder({0: 256})  # room for both prompts, not for both answers
    assert decoder.fits([first, second]) and not decoder.fits([first] * 4)
    decoder.add_many([("first", first), ("second", second)])
    ends, step = {}, 0
    while len(decoder):
        ends |= {e.key: (e.finish_reason, step) for e in decoder.step() if e.finish_reason}
        step += 1
    assert ends["second"][0] == "length" and ends["first"][1] > ends["second"][1]  # the newest yields first
    assert model.context_length > 256 and not decoder.sequences


def test_the_server_keeps_answering_when_requests_outgrow_its_cache(tmp_path, tokenizer):
    """A model whose context (512) is the server's whole KV cache: concurrent requests that could fill it
    several times over are all answered, and prompts that cannot fit at all are a 400."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import BadRequestError, OpenAI

    from linalign import Aligner
    from linalign.serve import create_app
    from linalign.serve.server import serving

    path = random_llama_gguf(tmp_path / "tiny-512.gguf", hidden=64, layers=2, context=512)
    app = create_app(Aligner(str(path), backend="llamacpp"))
    extra = {"linalign": {"method": "la", "principle": PRINCIPLE}}
    with serving(app) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)

        def ask(question: str):
            messages = [{"role": "user", "content": question}]
            return client.chat.completions.create(model="m", messages=messages, max_tokens=200, extra_body=extra)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, QUESTIONS))
        assert all(r.choices[0].finish_reason in ("length", "stop") for r in replies)
        assert sum(r.usage.completion_tokens for r in replies) > 200
        with pytest.raises(BadRequestError, match="do not fit the server's KV cache"):
            ask("tell me more " * 80)  # ~240 tokens: each context fits the model, both together do not
