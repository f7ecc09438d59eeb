"""Where the principle is told: the system message (the paper's), prefixed to the last user turn, or both."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.cli import _variant, app
from linalign.errors import LinalignError
from linalign.evaluation.runner import EvalSettings
from linalign.methods import make_plan
from linalign.prompts import build_ids, place_principle
from linalign.resolve import align_configs

QUESTION, PRINCIPLE = "Hi there", "Be brief."
PLACEMENTS = ("system", "user", "both")


@pytest.mark.parametrize("method", ["prompt", "la", "amulet"])
def test_only_the_principled_contexts_move_and_the_plain_one_is_the_same_for_every_placement(tiny, method):
    aligner, config = Aligner(tiny), DecodeConfig(max_new_tokens=4)
    tok = tiny.tokenizer
    plain = build_ids(tok, QUESTION, system="Be kind.")
    for placement in PLACEMENTS:
        align = AlignConfig(method=method, principles=[PRINCIPLE], principle_placement=placement)
        prepared = aligner.prepare(QUESTION, align, config, system="Be kind.")
        contexts = {t.principle: ids for t, ids in zip(prepared.plan.terms, prepared.term_ids, strict=True)}
        assert contexts[PRINCIPLE] == build_ids(tok, QUESTION, PRINCIPLE, "Be kind.", placement=placement)
        assert contexts.get(None, plain) == plain
    assert make_plan(AlignConfig(method="la", principles=[PRINCIPLE])).principle_placement == "system"


def test_a_bad_placement_is_a_clear_error_naming_the_field(tiny):
    unknown = "unknown principle_placement 'top'; choose one of system, user, both"
    with pytest.raises(LinalignError, match=unknown) as err:
        AlignConfig(method="la", principles=[PRINCIPLE], principle_placement="top")
    assert err.value.param == "principle_placement"
    with pytest.raises(LinalignError, match="unknown principle_placement"):
        place_principle([{"role": "user", "content": QUESTION}], None, PRINCIPLE, "user turn")
    with pytest.raises(LinalignError, match="principle_placement is read by method prompt or la or dera or amulet"):
        align_configs(["base"], [], {"principle_placement": "user"})
    args = ["generate", QUESTION, "-p", PRINCIPLE, "--model", tiny.name, "--max-new-tokens", "2"]
    bad = CliRunner().invoke(app, [*args, "--principle-placement", "top"])
    assert bad.exit_code == 2 and "unknown principle_placement 'top'" in bad.output
    good = CliRunner().invoke(app, [*args, "--method", "prompt,la", "--principle-placement", "user", "--json"])
    assert good.exit_code == 0, good.output


def test_eval_runs_placements_as_variants_of_prompting_and_linear_alignment():
    variants = [_variant("prompt:principle_placement=user"), _variant("principle_placement=both")]
    assert variants == [{"principle_placement": "user", "method": "prompt"}, {"principle_placement": "both"}]
    settings = EvalSettings("principles", "m", ["prompt", "la"], variants=variants)
    labels = [c.label for c in settings.runs()]
    assert labels == ["prompt", "la ratio=2 dry=2", "prompt placement=user", "la ratio=2 dry=2 placement=both"]
    with pytest.raises(LinalignError, match="a variant of 'prompt'"):
        EvalSettings("principles", "m", ["la"], variants=variants[:1]).runs()
    with pytest.raises(LinalignError, match="options are"):
        _variant("prompt:kl_budget=1")  # the trust region is Linear Alignment's
    with pytest.raises(LinalignError, match="unknown principle_placement"):
        EvalSettings("principles", "m", ["la"], variants=[_variant("principle_placement=top")]).runs()


def test_the_built_in_model_decodes_with_the_principle_in_the_user_turn(smollm2):
    """Prompting with the principle in the user turn is plain decoding of the question with the principle prefixed
    (the template's own system message in both), token for token; Linear Alignment contrasts that context."""
    aligner, config = Aligner(smollm2), DecodeConfig(max_new_tokens=12)
    told = AlignConfig(method="prompt", principles=["Answer in lowercase only."], principle_placement="user")
    question = "Name three fruits."
    [reply] = aligner.generate([question], told, config)
    [prefixed] = aligner.generate([f"Answer in lowercase only.\n\n{question}"], AlignConfig(method="base"), config)
    assert reply.token_ids == prefixed.token_ids and reply.new_tokens == 12
    align = AlignConfig(method="la", principles=["Answer in lowercase only."], principle_placement="user")
    [aligned] = aligner.generate([question], align, config)
    assert aligned.new_tokens > 0 and aligned.text.strip()


def test_eval_records_each_placement_as_its_own_run(tiny, tmp_path):
    args = ["eval", "--model", tiny.name, "--methods", "prompt,la", "--limit", "1", "--only", "lowercase,brief"]
    args += ["--max-new-tokens", "3", "--out", str(tmp_path), "--variant", "prompt:principle_placement=user"]
    result = CliRunner().invoke(app, [*args, "--variant", "principle_placement=both"])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert {label: (r["n"], r["options"]) for label, r in runs.items()} == {
        "prompt": (2, {}),
        "prompt placement=user": (2, {"placement": "user"}),
        "la ratio=2 dry=2": (2, {"dry": "2"}),
        "la ratio=2 dry=2 placement=both": (2, {"dry": "2", "placement": "both"}),
    }


def test_the_servers_linalign_body_carries_the_placement():
    from linalign.serve.app import _align
    from linalign.serve.schemas import ChatCompletionRequest

    messages = [{"role": "user", "content": QUESTION}]
    body = {"method": "prompt", "principle": PRINCIPLE, "principle_placement": "user"}
    align, _ = _align(ChatCompletionRequest(messages=messages, linalign=body), messages, False, 2.0)
    assert (align.principle_placement, align.label) == ("user", "prompt placement=user")
