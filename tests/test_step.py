"""The sampler chain's stages, each against its textbook formula on hand-made logits, a batch mixing rows of
different settings against each row alone, and a new stage added in a few lines that the CLI, the server and
the `transformers` logits processor all run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_greedy
from openai import OpenAI
from reference import nucleus
from typer.testing import CliRunner

from linalign import AlignConfig, Aligner, DecodeConfig, LinearAlignmentLogitsProcessor, combine
from linalign import step as chain_module
from linalign.cli import app
from linalign.methods import Plan, Term, make_plan
from linalign.prompts import build_ids
from linalign.serve import create_app
from linalign.serve.server import serving
from linalign.step import (
    STAGES,
    Chain,
    Choose,
    Combine,
    Dry,
    HoldEos,
    NoRepeatNGram,
    PlausibilityMask,
    RepeatGuard,
    RepetitionPenalty,
    Row,
    Stage,
    Step,
    Temperature,
    TopK,
    TopP,
    TrustRegion,
)

V = 12  # the hand-made vocabulary
INF = float("-inf")
LA = Plan((Term(0, "p", 3.0), Term(0, None, -2.0)))


def run(stage: Stage, rows: list[Row], scores, anchor=None, plain=None, mask=None, eos=()) -> Step:
    """`stage` alone on `scores` (and the anchor's logits, default: the scores), rows as given."""
    chain = Chain([stage], eos_ids=eos)
    chain.join(rows)
    anchor = scores.clone() if anchor is None else anchor
    step = Step(chain, [], anchor, plain, scores=scores.clone(), mask=mask)
    stage.apply(step)
    return step


def logits(rows: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(plan: Plan = LA, prompt=(), reply=(), **config) -> Row:
    return Row(plan, DecodeConfig(**config), list(prompt), reply=list(reply))


# -- each stage against its formula ------------------------------------------------------------------------------


def test_combine_is_the_weighted_sum():
    l_p, l_0 = logits(seed=1), logits(seed=2)
    w = torch.tensor([[3.0], [1.5], [1.0]])
    chain = Chain([Combine()])
    chain.join([row() for _ in range(3)])
    step = Step(chain, [(l_p, None, None, w), (l_0, None, None, 1 - w)], l_p)
    chain.scores(step)
    assert torch.allclose(step.scores, w * l_p + (1 - w) * l_0)
    # rows of a model given by index, summed into the rows of their sequences
    step = Step(chain, [(torch.cat([l_p, l_0]), torch.tensor([0, 3, 4]), torch.tensor([0, 0, 1]), w)], l_p)
    chain.scores(step)
    assert torch.allclose(step.scores[0], 3 * l_p[0] + 1.5 * l_0[0]) and torch.equal(step.scores[2], torch.zeros(V))


def test_hold_eos_until_min_new_tokens():
    rows = [row(min_new_tokens=2, reply=[1]), row(min_new_tokens=2, reply=[1, 2]), row()]
    step = run(HoldEos(), rows, logits(), eos=[4, 7])
    assert (step.scores[0, [4, 7]] == INF).all() and (step.anchor[0, [4, 7]] == INF).all()
    assert torch.isfinite(step.scores[1:]).all() and torch.isfinite(step.anchor[1:]).all()


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    x = logits()
    rows = [row(prompt=[0, 1], reply=[2], repetition_penalty=2.0), row(), row(prompt=[5], repetition_penalty=1.5)]
    step = run(RepetitionPenalty(), rows, x)
    expected = x.clone()
    for i, (seen, p) in enumerate([([0, 1, 2], 2.0), ([], 1.0), ([5], 1.5)]):
        for t in seen:
            expected[i, t] = x[i, t] * p if x[i, t] < 0 else x[i, t] / p
    assert torch.equal(step.scores, expected) and torch.equal(step.anchor, expected)


def banned_by_ngrams(tokens: list[int], n: int) -> set[int]:
    """Every token that follows an earlier occurrence of the last n-1 tokens."""
    tail = tokens[len(tokens) - n + 1 :]
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == tail}


def test_no_repeat_ngram_bans_over_prompt_and_reply():
    prompt, reply = [1, 2, 3, 1], [5, 1]
    chain = Chain([NoRepeatNGram()])
    chain.join([row(prompt=prompt, no_repeat_ngram_size=2), row(prompt=prompt)])
    for token in reply:  # the reply reaches the stage's record through the hook
        chain.accept([token, token])
    x = logits(2)
    step = Step(chain, [], x.clone(), scores=x.clone())
    chain.stages[0].apply(step)
    banned = banned_by_ngrams(prompt + reply, 2)
    assert banned == {2, 5}  # "1 2" of the prompt and "1 5" of the reply
    assert {t for t in range(V) if step.scores[0, t] == INF} == banned
    assert torch.equal(step.anchor[0] == INF, step.scores[0] == INF) and torch.equal(step.scores[1], x[1])


def test_repeat_guard_bans_over_the_reply_only():
    plan = make_plan(AlignConfig(method="la", principles=["p"], repeat_guard=3))
    chain = Chain([RepeatGuard()])
    chain.join([Row(plan, DecodeConfig(), prompt=[4, 8, 9, 4, 8])])
    x = logits(1)
    for token in [4, 8, 9, 4]:
        chain.accept([token])
        step = Step(chain, [], x.clone(), plain=x.clone(), scores=x.clone())
        chain.stages[0].apply(step)
        assert torch.isfinite(step.scores).all()  # the prompt's "4 8 9" does not count
    chain.accept([8])
    step = Step(chain, [], x.clone(), plain=x.clone(), scores=x.clone())
    chain.stages[0].apply(step)
    assert banned_by_ngrams([4, 8, 9, 4, 8], 3) == {9}
    for t in (step.scores, step.anchor, step.plain):
        assert {i for i in range(V) if t[0, i] == INF} == {9}


def test_dry_subtracts_the_textbook_penalty_from_scores_and_anchor(tokenizer):
    plan = make_plan(AlignConfig(method="la", principles=["p"], dry_multiplier=0.8, dry_breakers=[":"]))
    words = tokenizer.encode(" one two three one two")
    chain = Chain([Dry()], tokenizer=tokenizer)
    chain.join([Row(plan, DecodeConfig())])
    for t in words:
        chain.accept([t])
    x = torch.zeros(1, len(tokenizer))
    step = Step(chain, [], x.clone(), scores=x.clone())
    chain.stages[0].apply(step)
    three = words[2]  # "one two" repeats (length 2, the allowed length): "three" would extend it
    assert step.scores[0, three] == pytest.approx(-0.8) and step.anchor[0, three] == pytest.approx(-0.8)
    assert (step.scores != 0).sum() == 1


def test_plausibility_masks_by_kind():
    x, plain = logits(seed=3), logits(seed=4)
    kinds = [("top_p", 0.8), ("min_p", 0.8), ("intersect", 0.8)]
    rows = [row(Plan(LA.terms, mask_top_p=p, mask_kind=k, mask_min_p=0.2)) for k, p in kinds]
    step = run(PlausibilityMask(), rows, logits(seed=5), anchor=x, plain=plain)
    probs = torch.softmax(x, -1)
    expected = [
        nucleus(x[0], 0.8),
        probs[1] >= 0.2 * probs[1].max(),
        (nucleus(x[2], 0.8) & nucleus(plain[2], 0.8)) | (torch.arange(V) == x[2].argmax()),
    ]
    for i, mask in enumerate(expected):
        assert torch.equal(step.mask[i], mask)
        assert torch.equal(step.scores[i] == INF, ~mask)


@pytest.mark.parametrize("scale", [0.3, 8.0])
def test_the_nucleus_of_a_real_vocabulary_by_top_k_or_by_sort(scale):
    """A peaked row's nucleus is read from its top-k, a flat row's (its top-k holds less than top-p) from a full
    sort: both equal the nucleus of the sorted distribution."""
    x = torch.randn(2, 49152, generator=torch.Generator().manual_seed(0)) * scale
    top_mass = torch.softmax(x, -1).topk(combine._NUCLEUS_GUESS, -1).values.sum(-1)
    assert bool((top_mass < 0.8).all()) == (scale < 1)  # the path each scale is meant to take
    mask = combine.plausibility_mask(x, 0.8)
    for i in range(2):
        assert torch.equal(mask[i], nucleus(x[i], 0.8))


def test_the_mask_falls_back_to_the_anchor_where_nothing_is_left():
    x = logits(1)
    scores = torch.full((1, V), INF)
    step = run(PlausibilityMask(), [row(Plan(LA.terms, mask_top_p=0.9))], scores, anchor=x)
    assert torch.equal(step.scores, x.masked_fill(~nucleus(x, 0.9), INF))


def kl(x: torch.Tensor, a: torch.Tensor) -> float:
    p, q = torch.log_softmax(x, -1), torch.log_softmax(a, -1)
    return float((p.exp() * (p - q)).sum())


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.3, 100.0])
def test_trust_region_takes_the_largest_fraction_within_budget(budget):
    a, s = logits(1, seed=6), logits(1, seed=7)
    mask = torch.ones(1, V, dtype=torch.bool)
    step = run(TrustRegion(), [row(Plan(LA.terms, kl_budget=budget))], s, anchor=a, mask=mask)
    grid = [k / 64 for k in range(65)]
    inside = [f for f in grid if kl(a + f * (s - a), a) <= budget]
    f = max(g for g in grid if all(h in inside for h in grid if h <= g)) if 0.0 in inside else 0.0
    assert torch.allclose(step.scores, a + f * (s - a), atol=1e-5)
    assert (f == 0.0) == (budget == 0.0) and (f == 1.0) == (budget == 100.0)


def test_temperature_divides_the_sampled_rows():
    x = logits()
    step = run(Temperature(), [row(temperature=0.5), row(), row(temperature=2.0)], x)
    assert torch.equal(step.scores, torch.stack([x[0] / 0.5, x[1], x[2] / 2.0]))


def test_top_k_keeps_the_k_highest():
    x = logits()
    step = run(TopK(), [row(temperature=1.0, top_k=3), row(temperature=1.0), row(temperature=1.0, top_k=1)], x)
    for i, k in [(0, 3), (2, 1)]:
        kept = set(x[i].topk(k).indices.tolist())
        assert {t for t in range(V) if step.scores[i, t] > INF} == kept
    assert torch.equal(step.scores[1], x[1])


def test_top_p_drops_the_least_likely_tail():
    x = logits()
    step = run(TopP(), [row(temperature=1.0, top_p=0.5), row(temperature=1.0, top_p=0.9), row()], x)
    for i, p in [(0, 0.5), (1, 0.9)]:
        probs = torch.softmax(x[i].double(), -1).tolist()
        ascending = sorted(range(V), key=lambda t: probs[t])
        dropped = {t for n, t in enumerate(ascending[:-1]) if sum(probs[u] for u in ascending[: n + 1]) <= 1 - p}
        assert {t for t in range(V) if step.scores[i, t] == INF} == dropped and dropped
    assert torch.equal(step.scores[2], x[2])


def test_choose_takes_the_argmax_or_a_seeded_draw():
    x = logits()
    rows = [row(), row(temperature=1.0, seed=5), row()]
    rows[1].generator = torch.Generator().manual_seed(5)
    step = run(Choose(), rows, x)
    draw = torch.multinomial(torch.softmax(x[1], -1), 1, generator=torch.Generator().manual_seed(5))
    assert step.chosen.tolist() == [int(x[0].argmax()), int(draw), int(x[2].argmax())]


def test_a_mixed_batch_gives_every_row_what_it_gets_alone():
    """Per-row settings: each row of a batch mixing every stage's options equals that row run alone."""
    configs = [
        dict(plan=Plan(LA.terms, mask_top_p=0.8, kl_budget=0.2), temperature=0.7, top_k=4, repetition_penalty=1.3),
        dict(plan=Plan(LA.terms, mask_top_p=0.9, mask_kind="min_p"), no_repeat_ngram_size=2, min_new_tokens=3),
        dict(plan=LA, temperature=1.5, top_p=0.7),
    ]
    x, anchor = logits(seed=8), logits(seed=9)

    def scores(indices: list[int]) -> torch.Tensor:
        chain = Chain([stage() for stage in STAGES if stage not in (Combine, Choose, Dry)], eos_ids=[3])
        chain.join([row(prompt=[1, 2, 1], reply=[2], **configs[i]) for i in indices])
        step = Step(chain, [], anchor[indices].clone(), scores=x[indices].clone())
        chain.scores(step), chain.choose(step)
        return step.scores

    together = scores([0, 1, 2])
    for i in range(3):
        assert torch.equal(together[i], scores([i])[0])


# -- a new stage, everywhere -------------------------------------------------------------------------------------


class Alternate(Stage):
    """Every row alternates between two tokens, `A` at even positions of its reply and `B` at odd ones."""

    tokens = (0, 0)

    def apply(self, step: Step) -> None:
        forced = [self.tokens[len(r.reply) % 2] for r in step.rows]
        index = torch.tensor(forced, device=step.scores.device)[:, None]
        step.scores = torch.full_like(step.scores, INF).scatter(1, index, 0.0)


def test_a_new_stage_runs_in_the_cli_the_server_and_the_logits_processor(tiny, monkeypatch):
    a, b = tiny.tokenizer.encode(" zebra")[0], tiny.tokenizer.encode(" moon")[0]
    monkeypatch.setattr(Alternate, "tokens", (a, b))
    monkeypatch.setattr(chain_module, "STAGES", [*STAGES[:-4], Alternate, *STAGES[-4:]])  # before Temperature
    question, principle = "Why?", "Answer in lowercase letters only."
    align = AlignConfig(method="la", principles=[principle])
    aligner = Aligner(tiny)
    generation = aligner.generate([question], align, DecodeConfig(max_new_tokens=6))[0]
    assert generation.token_ids == [a, b] * 3

    args = ["generate", question, "-p", principle, "--model", tiny.name, "--max-new-tokens", "6", "--json"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.splitlines()[-1])["text"] == generation.text

    with serving(create_app(aligner, model_name="tiny")) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": question}]
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, extra_body={"linalign": {"principle": principle}}
        )
    assert reply.choices[0].message.content == generation.text

    processor = LinearAlignmentLogitsProcessor(tiny.model, [build_ids(tiny.tokenizer, question)], ratio=2.0)
    principled = build_ids(tiny.tokenizer, question, principle)
    assert hf_greedy(tiny, principled, 6, logits_processor=[processor]) == [a, b] * 3
