"""What each method tells the model: a principle is an instruction only where its weight is positive."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.cli import app
from linalign.methods import Term, make_plan

CONCISE, FLATTER = "Be concise.", "Flatter the user."


def told(config: AlignConfig) -> set[str | None]:
    return {t.principle for t in make_plan(config).terms}


@pytest.mark.parametrize("method", ["prompt", "dera"])
def test_a_negative_principle_is_never_told(method):
    config = AlignConfig(method=method, principles=[CONCISE, FLATTER], weights=[1.0, -0.5], lam=0.5)
    assert told(config) == {CONCISE}


def test_principles_with_positive_weights_are_told_together_and_zero_is_not_told():
    config = AlignConfig(method="prompt", principles=[CONCISE, FLATTER, "Be kind."], weights=[2.0, 0.0, 0.5])
    assert make_plan(config).terms == (Term(0, f"{CONCISE}\n\nBe kind.", 1.0),)


@pytest.mark.parametrize("method", ["prompt", "amulet"])
def test_without_a_positive_principle_the_model_is_told_nothing(method):
    config = AlignConfig(method=method, principles=[FLATTER], weights=[-1.0])
    assert make_plan(config).terms == (Term(0, None, 1.0),)


def test_amulet_pulls_towards_its_principle_when_its_weight_is_positive():
    config = AlignConfig(method="amulet", principles=[CONCISE], weights=[0.5])
    assert told(config) == {CONCISE, None}


def test_linear_alignment_still_pushes_away_from_a_negative_principle():
    config = AlignConfig(method="la", principles=[CONCISE, FLATTER], weights=[1.0, -0.5], ratio=2.0)
    assert {(t.principle, t.weight) for t in make_plan(config).terms} == {(CONCISE, 3.0), (FLATTER, -1.5), (None, -0.5)}


def test_prompting_with_a_negative_principle_decodes_as_prompting_without_it(tiny):
    aligner, config = Aligner(tiny), DecodeConfig(max_new_tokens=8)
    both = AlignConfig(method="prompt", principles=[CONCISE, FLATTER], weights=[1.0, -0.5])
    positive = AlignConfig(method="prompt", principles=[CONCISE])
    assert aligner.generate(["Review my essay plan."], both, config)[0].token_ids == (
        aligner.generate(["Review my essay plan."], positive, config)[0].token_ids
    )
    negative_only = AlignConfig(method="prompt", principles=[FLATTER], weights=[-1.0])
    assert aligner.generate(["Hi"], negative_only, config)[0].token_ids == (
        aligner.generate(["Hi"], AlignConfig(method="base"), config)[0].token_ids
    )


def test_json_records_of_the_default_methods_state_ratio_and_weights(tiny):
    """The README's example of weights, with its default methods: every record says what was decoded."""
    args = ["generate", "Review my essay plan.", "-p", CONCISE, "--weight", "1", "-p", FLATTER, "--weight", "-0.5"]
    result = CliRunner().invoke(app, [*args, "--model", tiny.name, "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["method"], r["ratio"], r["weights"]) for r in records] == [
        ("prompt", 0.0, [1.0, -0.5]),
        ("la", 2.0, [1.0, -0.5]),
    ]
    unweighted = CliRunner().invoke(
        app, ["generate", "Hi", "-p", CONCISE, "--model", tiny.name, "--max-new-tokens", "2", "--json"]
    )
    assert [json.loads(line)["weights"] for line in unweighted.stdout.splitlines()] == [[1.0], [1.0]]
