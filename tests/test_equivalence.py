"""Equivalence tests: the engine against plain `generate`, HF CFG, the authors' semantics, itself batched."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy
from reference import Paper, nucleus

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.hf import LinearAlignmentLogitsProcessor
from linalign.prompts import build_ids

PRINCIPLE = "Answer in lowercase letters only."
QUESTIONS = ["What is the capital of France?", "Name three animals that live in the sea, please.", "Why?"]


def engine_ids(aligner: Aligner, prompts, align: AlignConfig, n: int) -> list[list[int]]:
    """Token ids the engine chose per prompt (up to and including EOS)."""
    return [g.token_ids for g in aligner.generate(prompts, align, DecodeConfig(max_new_tokens=n))]


def reference_loop(loaded, contexts, weights, anchor, top_p, n, temperature=1.0, generator=None):
    """BRIEF's five rules, written plainly for any weighted contexts: batch 1, one full uncached pass per
    context per token; greedy, or sampling from `generator`. With contexts (principled, plain) and weights
    (1 + r, -r) it is the authors' algorithm."""
    eos = loaded.tokenizer.eos_token_id
    contexts, chosen = [list(c) for c in contexts], []
    for _ in range(n):
        with torch.no_grad():
            logits = [loaded.model(torch.tensor([c])).logits[0, -1].float() for c in contexts]
        combined = sum(w * lg for w, lg in zip(weights, logits, strict=True))
        mask = nucleus(logits[anchor], top_p, temperature)
        probs = torch.softmax(combined / temperature, -1) * mask
        if generator is None:
            token = int(probs.masked_fill(~mask, -1).argmax())
        else:
            if probs.sum() == 0:  # rule 4's fallback: the masked principled distribution
                probs = torch.softmax(logits[anchor] / temperature, -1) * mask
            token = int(torch.multinomial((probs / probs.sum())[None], 1, generator=generator))
        chosen.append(token)
        for c in contexts:
            c.append(token)
        if token == eos:
            break
    return chosen


def authors_reference(loaded, principled: list[int], plain: list[int], ratio: float, top_p: float, n: int, **kw):
    return reference_loop(loaded, [principled, plain], [1 + ratio, -ratio], 0, top_p, n, **kw)


@pytest.fixture(scope="module")
def tiny_aligner(tiny, tiny_other) -> Aligner:
    return Aligner(tiny, reference=tiny_other)


@pytest.mark.parametrize("question", QUESTIONS)
def test_ratio_zero_equals_plain_generate_on_principled_prompt(tiny_aligner, tiny, question):
    ids = build_ids(tiny.tokenizer, question, PRINCIPLE)
    expected = hf_greedy(tiny, ids, 24)
    got = engine_ids(tiny_aligner, [question], Paper(method="la", principles=[PRINCIPLE], ratio=0.0), 24)
    assert got[0] == expected


@pytest.mark.parametrize("ratio", [0.5, 2.0, 5.0])
def test_unmasked_la_equals_hf_classifier_free_guidance(tiny_aligner, tiny, ratio):
    question = QUESTIONS[1]
    principled = build_ids(tiny.tokenizer, question, PRINCIPLE)
    plain = build_ids(tiny.tokenizer, question)
    expected = hf_greedy(tiny, principled, 24, guidance_scale=1 + ratio, negative_prompt_ids=torch.tensor([plain]))
    align = Paper(method="la", principles=[PRINCIPLE], ratio=ratio, plausibility_top_p=1.0)
    assert engine_ids(tiny_aligner, [question], align, 24)[0] == expected


@pytest.mark.parametrize("ratio,top_p", [(2.0, 0.8), (5.0, 0.8), (1.0, 0.5)])
def test_masked_la_equals_authors_reference_loop(tiny_aligner, tiny, ratio, top_p):
    question = QUESTIONS[0]
    principled = build_ids(tiny.tokenizer, question, PRINCIPLE)
    plain = build_ids(tiny.tokenizer, question)
    expected = authors_reference(tiny, principled, plain, ratio, top_p, 20)
    align = Paper(method="la", principles=[PRINCIPLE], ratio=ratio, plausibility_top_p=top_p)
    assert engine_ids(tiny_aligner, [question], align, 20)[0] == expected


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_la_equals_authors_reference_sampling(tiny_aligner, tiny, temperature):
    """Same seed, same draws: the engine samples exactly what rule 4 samples, mask at temperature T included."""
    question = QUESTIONS[1]
    principled = build_ids(tiny.tokenizer, question, PRINCIPLE)
    plain = build_ids(tiny.tokenizer, question)
    generator = torch.Generator().manual_seed(11)
    expected = authors_reference(tiny, principled, plain, 2.0, 0.8, 20, temperature=temperature, generator=generator)
    config = DecodeConfig(max_new_tokens=20, temperature=temperature, seed=11)
    got = tiny_aligner.generate([question], Paper(method="la", principles=[PRINCIPLE]), config)[0].token_ids
    assert got == expected


@pytest.mark.parametrize("method", ["base", "prompt", "la", "dera"])
def test_batched_equals_one_at_a_time(tiny_aligner, method):
    align = Paper(method=method, principles=[PRINCIPLE], ratio=2.0, lam=0.5)
    batched = engine_ids(tiny_aligner, QUESTIONS, align, 16)
    single = [engine_ids(tiny_aligner, [q], align, 16)[0] for q in QUESTIONS]
    assert batched == single


@pytest.mark.parametrize("lam,which", [(1.0, "main"), (0.0, "reference")])
def test_dera_endpoints_equal_each_models_own_greedy_output(tiny_aligner, lam, which):
    loaded = tiny_aligner.main if which == "main" else tiny_aligner.reference
    ids = build_ids(loaded.tokenizer, QUESTIONS[0])
    expected = hf_greedy(loaded, ids, 20)
    assert engine_ids(tiny_aligner, [QUESTIONS[0]], Paper(method="dera", lam=lam), 20)[0] == expected


def test_dera_extrapolation_differs_from_both_endpoints(tiny_aligner):
    ends = [engine_ids(tiny_aligner, QUESTIONS[:1], Paper(method="dera", lam=lam), 20)[0] for lam in (0, 1)]
    beyond = engine_ids(tiny_aligner, QUESTIONS[:1], Paper(method="dera", lam=2.5), 20)[0]
    assert beyond not in ends


def test_hf_logits_processor_equals_engine(tiny_aligner, tiny):
    question = QUESTIONS[1]
    principled = build_ids(tiny.tokenizer, question, PRINCIPLE)
    plain = build_ids(tiny.tokenizer, question)
    processor = LinearAlignmentLogitsProcessor(tiny.model, [plain], ratio=2.0)
    got = hf_greedy(tiny, principled, 20, logits_processor=[processor])
    align = Paper(method="la", principles=[PRINCIPLE], ratio=2.0)
    assert got == engine_ids(tiny_aligner, [question], align, 20)[0]


def test_streaming_reassembles_generate_text(tiny_aligner):
    align = Paper(method="la", principles=[PRINCIPLE])
    config = DecodeConfig(max_new_tokens=12)
    texts = ["", "", ""]
    for deltas in tiny_aligner.stream(QUESTIONS, align, config):
        for d in deltas:
            texts[d.index] += d.text
    assert texts == [g.text for g in tiny_aligner.generate(QUESTIONS, align, config)]


def test_sampling_with_seed_is_reproducible(tiny_aligner):
    align = Paper(method="la", principles=[PRINCIPLE])
    runs = [
        tiny_aligner.generate(QUESTIONS, align, DecodeConfig(max_new_tokens=12, temperature=1.0, seed=s))
        for s in (7, 7, 8)
    ]
    assert [g.text for g in runs[0]] == [g.text for g in runs[1]]
    assert [g.text for g in runs[0]] != [g.text for g in runs[2]]


def test_a_seeded_sample_does_not_depend_on_its_companions(tiny_aligner):
    """Prompt i samples with seed + i from its own generator: alone, or beside others that finish early."""
    align = Paper(method="la", principles=[PRINCIPLE])

    def sample(prompts, seed, n=12):
        config = DecodeConfig(max_new_tokens=n, temperature=1.0, seed=seed)
        return [g.token_ids for g in tiny_aligner.generate(prompts, align, config)]

    batch = sample(QUESTIONS, 7)
    assert batch[0] == sample(QUESTIONS[:1], 7)[0]
    assert batch[1] == sample(QUESTIONS[1:2], 8)[0]
    assert batch[2] == sample([QUESTIONS[1], QUESTIONS[2]], 8)[1]
    assert len({tuple(ids) for ids in batch}) == 3


SECOND = "The user is a five-year-old child."


@pytest.mark.parametrize("weights", [(2.0, 1.5), (3.0, -1.0), (-0.5, 2.0)])
def test_several_principles_equal_reference_loop(tiny_aligner, tiny, weights):
    question = QUESTIONS[1]
    contexts = [build_ids(tiny.tokenizer, question, p) for p in (PRINCIPLE, SECOND)]
    contexts.append(build_ids(tiny.tokenizer, question))
    anchor = next(i for i, w in enumerate(weights) if w > 0)
    expected = reference_loop(tiny, contexts, [*weights, 1 - sum(weights)], anchor, 0.8, 16)
    align = Paper(method="la", principles=[PRINCIPLE, SECOND], weights=list(weights), ratio=0.0)
    assert engine_ids(tiny_aligner, [question], align, 16)[0] == expected


@pytest.mark.parametrize("weight,ratio", [(2.5, 0.0), (1.0, 1.5), (0.5, 4.0)])
def test_weights_scale_the_ratio(tiny_aligner, weight, ratio):
    """A principle's coefficient is c = w (1 + r): weight 2.5 at r = 0, 1 at 1.5 and 0.5 at 4 all decode as r = 1.5."""
    by_ratio = Paper(method="la", principles=[PRINCIPLE], ratio=1.5)
    by_weight = Paper(method="la", principles=[PRINCIPLE], weights=[weight], ratio=ratio)
    assert engine_ids(tiny_aligner, QUESTIONS, by_ratio, 16) == engine_ids(tiny_aligner, QUESTIONS, by_weight, 16)
    assert by_weight.label == f"la ratio={ratio:g} weights={weight:g}"


def test_zero_weight_principle_equals_run_without_it(tiny_aligner):
    alone = Paper(method="la", principles=[PRINCIPLE], weights=[3.0])
    with_zero = Paper(method="la", principles=[PRINCIPLE, SECOND], weights=[3.0, 0.0])
    assert engine_ids(tiny_aligner, QUESTIONS, with_zero, 16) == engine_ids(tiny_aligner, QUESTIONS, alone, 16)


def test_negative_principle_pushes_away(tiny_aligner, tiny):
    question = QUESTIONS[0]
    contexts = [build_ids(tiny.tokenizer, question, PRINCIPLE), build_ids(tiny.tokenizer, question)]
    expected = reference_loop(tiny, contexts, [-2.0, 3.0], 1, 0.8, 16)
    align = Paper(method="la", principles=[PRINCIPLE], weights=[-2.0], ratio=0.0)
    assert engine_ids(tiny_aligner, [question], align, 16)[0] == expected


@pytest.mark.parametrize("method", ["prompt", "la"])
def test_per_prompt_principles_equal_separate_runs(tiny_aligner, method):
    rows = [[PRINCIPLE], [SECOND], ["Reply in French."]]
    align = Paper(method=method, principles=["placeholder"], ratio=2.0)
    batched = [
        g.token_ids for g in tiny_aligner.generate(QUESTIONS, align, DecodeConfig(max_new_tokens=12), principles=rows)
    ]
    single = [
        engine_ids(tiny_aligner, [q], Paper(method=method, principles=p, ratio=2.0), 12)[0]
        for q, p in zip(QUESTIONS, rows, strict=True)
    ]
    assert batched == single


def test_rows_with_different_numbers_of_contexts_share_a_batch(tiny_aligner):
    """One, two and three contexts per row in one batch, rows finishing at different steps: each row decodes
    as it would alone."""
    configs = [
        Paper(method="prompt", principles=[PRINCIPLE]),
        Paper(method="la", principles=[PRINCIPLE], ratio=2.0),
        Paper(method="la", principles=[PRINCIPLE, SECOND], weights=[1.0, -0.5], ratio=1.0),
    ]
    lengths = [3, 12, 7]
    prepared = [
        tiny_aligner.prepare(q, a, DecodeConfig(max_new_tokens=n))
        for q, a, n in zip(QUESTIONS, configs, lengths, strict=True)
    ]
    batched: dict[int, list[int]] = {i: [] for i in range(3)}
    for events in tiny_aligner.decode(prepared):
        for e in events:
            batched[e.key].append(e.token)
    for i, (q, a, n) in enumerate(zip(QUESTIONS, configs, lengths, strict=True)):
        assert batched[i] == engine_ids(tiny_aligner, [q], a, n)[0]


def amulet_reference(loaded, principled, plain, iterations, eta, alpha, lam, n):
    """The authors' Amulet loop, written plainly: full vector iterations with renormalisation each step."""
    eos = loaded.tokenizer.eos_token_id
    p, q, chosen = list(principled), list(plain), []
    for _ in range(n):
        with torch.no_grad():
            log_p = torch.log_softmax(loaded.model(torch.tensor([p])).logits[0, -1].double(), -1)
            log_0 = torch.log_softmax(loaded.model(torch.tensor([q])).logits[0, -1].double(), -1)
        current, utilities = log_p, torch.zeros_like(log_p)
        for t in range(1, iterations + 1):
            utilities = utilities + alpha * (current - log_0)
            current = (lam * log_p + utilities / t + current / (eta * t)) / (lam + 1 / (eta * t))
            current = torch.log_softmax(current, -1)
        token = int(current.argmax())
        chosen.append(token)
        p.append(token)
        q.append(token)
        if token == eos:
            break
    return chosen


@pytest.mark.parametrize("iterations,eta,alpha,lam", [(60, 10.0, 2.0, 2.0), (5, 1.0, 0.5, 1.0), (1, 10.0, 2.0, 2.0)])
def test_amulet_equals_the_authors_iteration(tiny_aligner, tiny, iterations, eta, alpha, lam):
    question = QUESTIONS[1]
    principled = build_ids(tiny.tokenizer, question, PRINCIPLE)
    plain = build_ids(tiny.tokenizer, question)
    expected = amulet_reference(tiny, principled, plain, iterations, eta, alpha, lam, 16)
    align = Paper(
        method="amulet",
        principles=[PRINCIPLE],
        amulet_iterations=iterations,
        amulet_eta=eta,
        amulet_alpha=alpha,
        amulet_lambda=lam,
    )
    assert engine_ids(tiny_aligner, [question], align, 16)[0] == expected


def test_amulet_with_zero_iterations_is_principled_decoding(tiny_aligner):
    amulet = Paper(method="amulet", principles=[PRINCIPLE], amulet_iterations=0)
    prompt = Paper(method="prompt", principles=[PRINCIPLE])
    assert engine_ids(tiny_aligner, QUESTIONS, amulet, 16) == engine_ids(tiny_aligner, QUESTIONS, prompt, 16)


def test_amulet_weights_sum_to_one_and_grow_with_iterations():
    from linalign.amulet import amulet_weights

    assert amulet_weights(0, 10, 2, 2) == (1.0, 0.0)
    previous = 1.0
    for iterations in (1, 5, 20, 60):
        a, b = amulet_weights(iterations, 10, 2, 2)
        assert a + b == pytest.approx(1.0) and a > previous
        previous = a


def test_ratio_zero_equals_generate_with_standard_processors(tiny_aligner, tiny):
    question = QUESTIONS[2]
    ids = build_ids(tiny.tokenizer, question, PRINCIPLE)
    expected = hf_greedy(tiny, ids, 24, repetition_penalty=1.3, no_repeat_ngram_size=2)
    align = Paper(method="la", principles=[PRINCIPLE], ratio=0.0)
    config = DecodeConfig(max_new_tokens=24, repetition_penalty=1.3, no_repeat_ngram_size=2)
    assert tiny_aligner.generate([question], align, config)[0].token_ids == expected


def test_min_new_tokens_holds_back_eos_as_generate_does(tiny_aligner, tiny, monkeypatch):
    question = QUESTIONS[0]
    ids = build_ids(tiny.tokenizer, question, PRINCIPLE)
    ends = sorted(set(hf_greedy(tiny, ids, 6)))  # the tokens greedy decoding picks first now end a sequence
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", ends)
    align = Paper(method="la", principles=[PRINCIPLE], ratio=0.0)
    assert len(tiny_aligner.generate([question], align, DecodeConfig(max_new_tokens=12))[0].token_ids) == 1
    expected = hf_greedy(tiny, ids, 12, min_new_tokens=8)
    got = tiny_aligner.generate([question], align, DecodeConfig(max_new_tokens=12, min_new_tokens=8))[0].token_ids
    assert got == expected and len(got) >= 8
