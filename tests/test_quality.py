"""Quality options of Linear Alignment and the held-out principle set they are judged on.

The held-out checkers get a complying and a violating reply each; every engine option is held to a plain
reference loop (batch 1, uncached, written from the option's definition) token for token under greedy decoding.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import hf_greedy
from reference import Paper, nucleus

from linalign import Aligner, DecodeConfig, LinearAlignmentLogitsProcessor
from linalign.errors import LinalignError
from linalign.evaluation import checkers
from linalign.evaluation.datasets import load_principles, load_questions
from linalign.evaluation.suites import build_tasks
from linalign.prompts import build_ids

HELDOUT_CASES = {
    "numbered": ("1. Grind fresh beans.\n2. Use hot water.", "1. Grind fresh beans.\nThen use hot water."),
    "one_paragraph": ("Grind fresh beans and use water just off the boil.", "Grind fresh beans.\n\nUse hot water."),
    "quoted": ('"Grind fresh beans and brew."', 'Grind fresh beans and brew."'),
    "calm": ("Grind fresh beans.", "Grind fresh beans!"),
    "polite": ("Thank you for asking: grind fresh beans.", "Grind fresh beans, thankfully."),
    "ask_back": ("Grind fresh beans. Do you own a grinder?", "Do you own a grinder? Grind fresh beans."),
    "three_sentences": ("Grind beans. Brew them. Enjoy", "Grind beans. Brew them. Pour. Enjoy."),
    "with_digits": ("Use 15 grams of coffee.", "Use fifteen grams of coffee."),
    "pirate": ("Arr, matey, grind the beans!", "Grind the beans, my friend. Arrange the cups."),
    "robot": ("Beep boop! Grind the beans.", "Grind the beans. Beep boop."),
}


def test_heldout_set_is_new_and_every_principle_has_twenty_questions():
    heldout, main = load_principles(principle_set="heldout"), load_principles()
    assert len(heldout) >= 8
    assert not {p.id for p in heldout} & {p.id for p in main}
    assert not {p.principle for p in heldout} & {p.principle for p in main}
    assert len(load_questions()) >= 20
    tasks = build_tasks("principles-heldout", limit=20)
    assert len(tasks) == 20 * len(heldout)
    assert all(t.check in checkers.CHECKERS for t in tasks)


@pytest.mark.parametrize("pid", sorted(HELDOUT_CASES))
def test_heldout_checker_passes_and_fails(pid):
    principle = {p.id: p for p in load_principles(principle_set="heldout")}[pid]
    good, bad = HELDOUT_CASES[pid]
    assert checkers.check(principle.check, good, principle.params)
    assert not checkers.check(principle.check, bad, principle.params)
    assert not checkers.check(principle.check, "", principle.params)


def test_every_heldout_principle_has_a_case():
    assert {p.id for p in load_principles(principle_set="heldout")} == set(HELDOUT_CASES)


# -- the engine's quality options against plain reference loops ----------------------------------------------------

PRINCIPLE = "Answer in lowercase letters only."
QUESTIONS = ["What is the capital of France?", "Name three animals that live in the sea, please.", "Why?"]
N = 16
RATIO = 8.0  # strong enough that every option changes some choice of the tiny model


def reference_mask(lp: torch.Tensor, l0: torch.Tensor, kind: str, top_p: float, min_p: float) -> torch.Tensor:
    if kind == "min_p":
        probs = torch.softmax(lp, -1)
        return probs >= min_p * probs.max()
    keep = nucleus(lp, top_p)
    if kind == "intersect":
        keep = keep & nucleus(l0, top_p)
        keep[lp.argmax()] = True
    return keep


def kl_on(x: torch.Tensor, lp: torch.Tensor, keep: torch.Tensor) -> float:
    p, q = torch.log_softmax(x[keep], -1), torch.log_softmax(lp[keep], -1)
    return float((p.exp() * (p - q)).sum())


def reference_options(loaded, principled, plain, ratio, n, kind="top_p", top_p=0.8, min_p=0.1, kl=None, guard=0):
    """Linear Alignment with the quality options, from their definitions: batch 1, two full uncached passes
    per token, a linear scan over the trust region's fractions k/64, the guard's n-grams searched anew."""
    eos = loaded.tokenizer.eos_token_id
    contexts, chosen = [list(principled), list(plain)], []
    for _ in range(n):
        with torch.no_grad():
            lp, l0 = (loaded.model(torch.tensor([c])).logits[0, -1].float() for c in contexts)
        combined = (1 + ratio) * lp - ratio * l0
        if guard:  # tokens that would repeat an n-gram of the reply leave every distribution
            suffix = chosen[len(chosen) - guard + 1 :]
            for i in range(len(chosen) - guard + 1):
                if len(chosen) >= guard - 1 and chosen[i : i + guard - 1] == suffix:
                    for logits in (lp, l0, combined):
                        logits[chosen[i + guard - 1]] = float("-inf")
        keep = reference_mask(lp, l0, kind, top_p, min_p)
        if kl is not None:
            best = 0
            for k in range(65):
                if kl_on(lp + k / 64 * (combined - lp), lp, keep) > kl:
                    break
                best = k
            if best < 64:
                combined = lp + best / 64 * (combined - lp)
        allowed = combined.masked_fill(~keep, float("-inf"))
        if not torch.isfinite(allowed).any():
            allowed = lp.masked_fill(~keep, float("-inf"))
        token = int(allowed.argmax())
        chosen.append(token)
        for c in contexts:
            c.append(token)
        if token == eos:
            break
    return chosen


@pytest.fixture(scope="module")
def tiny_aligner(tiny) -> Aligner:
    return Aligner(tiny)


OPTIONS = {
    "guard2": dict(repeat_guard=2),
    "guard3": dict(repeat_guard=3),
    "kl_small": dict(kl_budget=0.05),
    "kl_mid": dict(kl_budget=0.5),
    "min_p": dict(mask="min_p", plausibility_min_p=0.2),
    "intersect": dict(mask="intersect"),
    "all": dict(kl_budget=0.3, repeat_guard=3, mask="min_p", plausibility_min_p=0.05),
}


def _reference_kwargs(options: dict) -> dict:
    return {
        "kind": options.get("mask", "top_p"),
        "min_p": options.get("plausibility_min_p", 0.1),
        "kl": options.get("kl_budget"),
        "guard": options.get("repeat_guard", 0),
    }


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_equals_its_reference_loop_batched(tiny_aligner, tiny, name, ratio=RATIO):
    options = OPTIONS[name]
    align = Paper(method="la", principles=[PRINCIPLE], ratio=ratio, **options)
    got = [g.token_ids for g in tiny_aligner.generate(QUESTIONS, align, DecodeConfig(max_new_tokens=N))]
    for question, tokens in zip(QUESTIONS, got, strict=True):
        principled, plain = build_ids(tiny.tokenizer, question, PRINCIPLE), build_ids(tiny.tokenizer, question)
        assert tokens == reference_options(tiny, principled, plain, ratio, N, **_reference_kwargs(options))


@pytest.mark.parametrize("name", ["guard2", "kl_mid", "min_p", "intersect", "all"])
def test_logits_processor_takes_the_options_and_equals_the_reference(tiny, name):
    """The options inside `transformers`' own `generate`, one prompt, token for token against the reference."""
    options = OPTIONS[name]
    question = QUESTIONS[1]
    principled, plain = build_ids(tiny.tokenizer, question, PRINCIPLE), build_ids(tiny.tokenizer, question)
    processor = LinearAlignmentLogitsProcessor(tiny.model, [plain], ratio=RATIO, **options)
    got = hf_greedy(tiny, principled, N, logits_processor=[processor])
    expected = reference_options(tiny, principled, plain, RATIO, N, **_reference_kwargs(options))
    assert got == expected[: len(got)] and len(got) in (N, len(expected))
    with pytest.raises(LinalignError, match="unknown option"):
        LinearAlignmentLogitsProcessor(tiny.model, [plain], repeat_gaurd=4)
    with pytest.raises(LinalignError, match="repeat_guard"):
        LinearAlignmentLogitsProcessor(tiny.model, [plain], repeat_guard=1)


CYCLE = (300, 301, 302)


@contextmanager
def looping(loaded):
    """The model made to loop: after any token, a large bonus on the next token of a 3-token cycle (the same
    in every context, so the contrast keeps it), as a degenerate Linear Alignment reply repeats itself."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids[:, ids.shape[1] - output.logits.shape[1] :]  # the positions whose logits were asked for
        follow = torch.full_like(ids, CYCLE[0])
        for a, b in zip(CYCLE, CYCLE[1:] + CYCLE[:1], strict=True):
            follow[ids == a] = b
        output.logits.scatter_add_(
            -1, follow[..., None], torch.full_like(follow[..., None], 30.0, dtype=output.logits.dtype)
        )
        return output

    handle = loaded.model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("n", [2, 3])
def test_repeat_guard_breaks_a_loop_and_equals_its_reference(tiny_aligner, tiny, n):
    config = DecodeConfig(max_new_tokens=N)
    with looping(tiny):
        loop = tiny_aligner.generate(QUESTIONS[:2], Paper(principles=[PRINCIPLE], ratio=2.0), config)
        guarded = tiny_aligner.generate(QUESTIONS[:2], Paper(principles=[PRINCIPLE], ratio=2.0, repeat_guard=n), config)
        assert all(g.token_ids[:6] == list(CYCLE * 2) for g in loop)
        for question, g in zip(QUESTIONS[:2], guarded, strict=True):
            grams = [tuple(g.token_ids[i : i + n]) for i in range(len(g.token_ids) - n + 1)]
            assert len(grams) == len(set(grams))
            principled, plain = build_ids(tiny.tokenizer, question, PRINCIPLE), build_ids(tiny.tokenizer, question)
            assert g.token_ids == reference_options(tiny, principled, plain, 2.0, N, guard=n)


def test_options_change_the_choice(tiny_aligner):
    """Each option acts on the tiny model (else the equivalence above would prove nothing); the guard,
    which needs a loop to act, is shown acting above."""
    config = DecodeConfig(max_new_tokens=N)
    paper = [g.token_ids for g in tiny_aligner.generate(QUESTIONS, Paper(principles=[PRINCIPLE], ratio=8.0), config)]
    for name, options in OPTIONS.items():
        if name.startswith("guard"):
            continue
        align = Paper(principles=[PRINCIPLE], ratio=RATIO, **options)
        assert [g.token_ids for g in tiny_aligner.generate(QUESTIONS, align, config)] != paper, name


def test_unbounded_budget_is_the_paper_and_plans_mix_in_one_batch(tiny_aligner):
    """A KL budget no step reaches keeps r; sequences with different options share a batch unchanged."""
    config = DecodeConfig(max_new_tokens=N)
    aligns = [Paper(principles=[PRINCIPLE], ratio=4.0, **o) for o in ({}, {"kl_budget": 1e9}, OPTIONS["all"])]
    alone = [tiny_aligner.generate([QUESTIONS[1]], a, config)[0].token_ids for a in aligns]
    assert alone[0] == alone[1]
    prepared = [tiny_aligner.prepare(QUESTIONS[1], a, config) for a in aligns]
    mixed: dict[int, list[int]] = {i: [] for i in range(len(aligns))}
    for events in tiny_aligner.decode(prepared):
        for e in events:
            if e.token is not None:
                mixed[e.key].append(e.token)
    assert [mixed[i] for i in range(len(aligns))] == alone


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kl_budget": 0.0}, "kl_budget must be > 0"),
        ({"kl_budget": -1.0}, "kl_budget must be > 0"),
        ({"kl_budget": float("nan")}, "kl_budget must be a finite number"),
        ({"kl_budget": float("inf")}, "kl_budget must be a finite number"),
        ({"kl_budget": 1.0, "method": "prompt"}, "kl_budget applies to Linear Alignment"),
        ({"kl_budget": 1.0, "plausibility_top_p": 1.0}, "it needs a plausibility_top_p"),
        ({"repeat_guard": 1}, "repeat_guard must be 0"),
        ({"repeat_guard": -2}, "repeat_guard must be an integer"),
        ({"mask": "top_k"}, "unknown mask"),
        ({"mask": "min_p", "plausibility_min_p": 0.0}, "plausibility_min_p must be in (0, 1]"),
        ({"mask": "min_p", "plausibility_top_p": 1.0}, "contradicts plausibility_top_p"),
        ({"mask": "intersect", "method": "amulet"}, "needs the plain context"),
    ],
)
def test_bad_quality_options_are_refused_with_a_sentence(options, message):
    kwargs = {"method": "la", "principles": [PRINCIPLE]} | options
    with pytest.raises(LinalignError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        Paper(**kwargs)


def test_labels_name_the_options_and_keep_the_paper_label():
    assert Paper(principles=[PRINCIPLE]).label == "la ratio=2"
    assert Paper(principles=[PRINCIPLE], kl_budget=0.5, repeat_guard=3).label == "la ratio=2 kl=0.5 guard=3"
    assert Paper(principles=[PRINCIPLE], mask="min_p").label == "la ratio=2 mask=min_p0.1"


# -- the Pareto view and the eval sweep of the options ------------------------------------------------------------


def _records(run: str, scores: list[bool], ppl: float, rep: float) -> list[dict]:
    return [
        {
            "run": run,
            "method": "la",
            "task": f"t/{i}",
            "group": "t",
            "score": s,
            "perplexity": ppl,
            "repeat4": rep,
            "new_tokens": 10,
            "distinct2": 1.0,
            "text": "x",
            "finish_reason": "stop",
        }
        for i, s in enumerate(scores)
    ]


def test_pareto_marks_the_frontier_and_applies_the_rule():
    from linalign.evaluation.pareto import pareto
    from linalign.evaluation.report import summarise

    records = (
        _records("prompt", [True] * 2 + [False] * 18, 2.0, 0.02)
        + _records("la ratio=2", [True] * 8 + [False] * 12, 3.5, 0.04)
        + _records("la ratio=2 guard=4", [True] * 8 + [False] * 12, 2.8, 0.01)
        + _records("la ratio=8", [True] * 9 + [False] * 11, 10.0, 0.05)
    )
    view = pareto(records, summarise(records)["runs"])
    runs = view["runs"]
    assert {k for k, v in runs.items() if v["frontier"]} == {"prompt", "la ratio=2 guard=4", "la ratio=8"}
    assert runs["la ratio=2 guard=4"]["dominates_reference"] is True
    assert runs["la ratio=8"]["dominates_reference"] is False  # perplexity over 1.5x prompting's
    assert runs["prompt"]["dominates_reference"] is False  # compliance lower beyond the interval
    low, high = runs["la ratio=2"]["score_low"], runs["la ratio=2"]["score_high"]
    assert low < 0.4 < high
    assert view["limits"] == {"perplexity": 3.0, "repeat4": 0.02}


def test_pareto_resamples_questions_not_their_samples():
    """Three samples of each question: the interval is that of the questions' mean scores, and the paired
    difference pairs questions."""
    from linalign.evaluation.pareto import bootstrap_interval, pareto
    from linalign.evaluation.report import summarise

    per_question = [True] * 6 + [False] * 4
    a = [dict(r, task=f"{r['task']}#{k}") for k in range(3) for r in _records("la ratio=2", per_question, 3, 0.0)]
    b = [dict(r, task=f"{r['task']}#{k}") for k in range(3) for r in _records("prompt", [False] * 10, 2, 0.0)]
    view = pareto(a + b, summarise(a + b)["runs"])
    entry = view["runs"]["la ratio=2"]
    assert (entry["score_low"], entry["score_high"]) == bootstrap_interval([float(s) for s in per_question])
    assert view["runs"]["prompt"]["vs_reference"]["tasks"] == 10


def test_eval_sweeps_the_options_as_variants(tmp_path):
    from linalign.cli import _variants
    from linalign.evaluation.runner import EvalSettings

    variants = _variants("0.5,1", "4", "min_p:0.05,intersect", ["kl_budget=1,repeat_guard=3"])
    assert variants == [
        {"kl_budget": 0.5},
        {"kl_budget": 1.0},
        {"repeat_guard": 4},
        {"mask": "min_p", "plausibility_min_p": 0.05},
        {"mask": "intersect"},
        {"kl_budget": 1.0, "repeat_guard": 3},
    ]
    settings = EvalSettings(
        "principles",
        "m",
        ["prompt", "la"],
        ratios=[2.0],
        variants=variants[:3],
        variant_ratios=[2.0, 8.0],
        preset="paper",
    )
    labels = [a.label for a in settings.runs()]
    assert labels == [
        "prompt",
        "la ratio=2",
        "la ratio=2 kl=0.5",
        "la ratio=8 kl=0.5",
        "la ratio=2 kl=1",
        "la ratio=8 kl=1",
        "la ratio=2 guard=4",
        "la ratio=8 guard=4",
    ]
    with pytest.raises(LinalignError, match="options are ratio="):
        _variants(None, None, None, ["top_k=3"])
    pinned = EvalSettings(
        "principles",
        "m",
        ["la"],
        ratios=[2.0],
        variants=_variants(None, None, None, ["ratio=8,kl_budget=1"]),
        preset="paper",
    )
    assert [a.label for a in pinned.runs()] == ["la ratio=2", "la ratio=8 kl=1"]


def test_server_request_carries_the_options_and_refuses_bad_ones():
    from linalign.serve.app import APIError, _align
    from linalign.serve.schemas import ChatCompletionRequest

    def request(**options):
        options = {"principle": PRINCIPLE, "preset": "paper", **options}
        return ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], linalign=options)

    body = request(kl_budget=1.0, repeat_guard=4, mask="min_p", plausibility_min_p=0.05)
    align, _ = _align(body, [{"role": "user", "content": "Hi"}], False, 2.0)
    assert align.label == "la ratio=2 kl=1 guard=4 mask=min_p0.05"
    with pytest.raises(APIError, match="kl_budget must be > 0"):
        _align(request(kl_budget=0.0), [{"role": "user", "content": "Hi"}], False, 2.0)


def test_cli_takes_the_options_and_refuses_bad_ones(tiny, tmp_path):
    from typer.testing import CliRunner

    from linalign.cli import app

    args = ["generate", "Why?", "-p", PRINCIPLE, "--model", tiny.name, "--max-new-tokens", "3", "--json"]
    ok = CliRunner().invoke(app, [*args, "--method", "prompt,la", "--kl-budget", "0.5", "--repeat-guard", "3"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, [*args, "--method", "la", "--kl-budget", "0"])
    assert bad.exit_code == 2 and "kl_budget must be > 0" in bad.output
    sweep = ["eval", "--model", tiny.name, "--limit", "1", "--out", str(tmp_path), "--kl-budgets", "-1"]
    bad_sweep = CliRunner().invoke(app, sweep)
    assert bad_sweep.exit_code == 2 and "kl_budget must be > 0" in bad_sweep.output
