"""The evaluation runner, metrics, judges and reports (data and checkers have their own tests)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from linalign import Aligner
from linalign.cli import app
from linalign.errors import LinalignError
from linalign.evaluation.judges import judge_pairs, parse_verdict
from linalign.evaluation.metrics import distinct_n, perplexities, repeated_ngram_rate
from linalign.evaluation.report import summarise, write_reports
from linalign.evaluation.runner import RECORDS, SETTINGS, EvalSettings, judge_runs, read_records, run_eval
from linalign.evaluation.suites import Task, build_tasks, question_of, sampled
from linalign.prompts import build_ids


def test_distinct_and_repetition():
    assert distinct_n("the cat sat on the mat", 2) == 1.0
    assert distinct_n("go go go go", 2) == pytest.approx(1 / 3)
    assert distinct_n("one", 2) is None
    assert repeated_ngram_rate("a b c d a b c d", 4) == pytest.approx(1 / 5)
    assert repeated_ngram_rate("a b c d e", 4) == 0.0
    assert repeated_ngram_rate("a b", 4) is None


def test_perplexity_matches_a_direct_computation(tiny):
    context = build_ids(tiny.tokenizer, "Say something.")
    outputs = [[100, 200, 300], [5, 6], []]
    got = perplexities(tiny, [context] * 3, outputs)
    for output, value in zip(outputs[:2], got[:2], strict=True):
        ids = torch.tensor([context + output])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny.model(ids).logits[0, :-1].float(), -1)
        nll = -torch.stack([logprobs[len(context) - 1 + i, t] for i, t in enumerate(output)]).mean()
        assert value == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert got[2] is None


def test_parse_verdict():
    assert parse_verdict("A") == "A"
    assert parse_verdict("Response B is better.") == "B"
    assert parse_verdict("t") == "T"
    assert parse_verdict("Neither.") is None


def test_pairs_are_judged_in_both_orders():
    seen = []

    def always_first_position(prompts):
        seen.extend(prompts)
        return ["A"] * len(prompts)

    def prefers_text_x(prompts):
        return ["A" if prompts_a_is_x(p) else "B" for p in prompts]

    def prompts_a_is_x(prompt):
        return prompt.index("xx-answer") < prompt.index("yy-answer")

    position_biased = judge_pairs(always_first_position, ["p"], ["q"], ["xx-answer"], ["yy-answer"])
    assert position_biased[0].outcome == "tie" and len(seen) == 2
    assert judge_pairs(prefers_text_x, ["p"], ["q"], ["xx-answer"], ["yy-answer"])[0].outcome == "win"
    assert judge_pairs(prefers_text_x, ["p"], ["q"], ["yy-answer"], ["xx-answer"])[0].outcome == "loss"


def _tasks():
    return [
        Task(f"t{i}", q, "Answer in lowercase letters only.", "g", q, check="lowercase_only")
        for i, q in enumerate(["What is two plus two?", "Name a colour.", "Say hello.", "Why?"])
    ]


def test_runner_streams_and_resumes(tiny, tmp_path):
    aligner = Aligner(tiny)
    settings = EvalSettings(suite="test", model="tiny", methods=["prompt", "la"], ratios=[1.0, 4.0], max_new_tokens=4)
    records = run_eval(aligner, _tasks()[:2], settings, tmp_path, batch_size=2, show_progress=False)
    assert len(records) == 2 * 3
    assert {r["run"] for r in records} == {"prompt", "la ratio=1 dry=2", "la ratio=4 dry=2"}  # the default preset
    first_lines = (tmp_path / RECORDS).read_text().splitlines()
    # an interrupted write leaves a partial line: it is dropped and that work redone
    with (tmp_path / RECORDS).open("a") as f:
        f.write('{"run": "la ratio=1 dry=2", "task": "t2", "te')
    again = run_eval(aligner, _tasks(), settings, tmp_path, batch_size=3, show_progress=False)
    assert len(again) == 4 * 3
    assert (tmp_path / RECORDS).read_text().splitlines()[: len(first_lines)] == first_lines
    assert len(read_records(tmp_path / RECORDS)) == 12
    assert all(r["perplexity"] is None or r["perplexity"] > 1 for r in again)
    assert all(isinstance(r["score"], bool) for r in again)


def test_runner_refuses_a_directory_with_other_settings(tiny, tmp_path):
    aligner = Aligner(tiny)
    settings = EvalSettings(suite="test", model="tiny", methods=["base"], max_new_tokens=2)
    run_eval(aligner, _tasks()[:1], settings, tmp_path, show_progress=False, fluency=False)
    changed = EvalSettings(suite="test", model="tiny", methods=["base"], max_new_tokens=3)
    with pytest.raises(LinalignError, match="max_new_tokens"):
        run_eval(aligner, _tasks()[:1], changed, tmp_path, show_progress=False)


def test_results_from_before_the_presets_count_as_the_papers(tiny, tmp_path):
    """A directory whose settings predate `preset` was made with the paper's recipe: resuming it under the
    default preset would mix the two, so it is refused; under the paper's preset it resumes."""
    aligner, tasks = Aligner(tiny), _tasks()[:1]
    settings = EvalSettings(suite="test", model="tiny", methods=["base"], max_new_tokens=2, preset="paper")
    run_eval(aligner, tasks, settings, tmp_path, show_progress=False, fluency=False)
    stored = json.loads((tmp_path / SETTINGS).read_text())
    (tmp_path / SETTINGS).write_text(json.dumps({k: v for k, v in stored.items() if k != "preset"}))
    with pytest.raises(LinalignError, match="preset"):
        run_eval(aligner, tasks, replace(settings, preset="default"), tmp_path, show_progress=False)
    assert len(run_eval(aligner, tasks, settings, tmp_path, show_progress=False, fluency=False)) == 1


def test_samples_have_their_own_seeds_whatever_the_batching(tiny, tmp_path):
    """Three samples a question: distinct replies, each reproduced exactly by another batching and a resume."""
    settings = EvalSettings(
        suite="test", model="tiny", methods=["la"], max_new_tokens=6, temperature=1.0, seed=7, samples=3
    )
    tasks = sampled(_tasks()[:2], settings.samples)
    assert [t.id for t in tasks] == ["t0#0", "t0#1", "t0#2", "t1#0", "t1#1", "t1#2"]
    assert {question_of(t.id) for t in tasks} == {"t0", "t1"}
    aligner = Aligner(tiny)
    together = run_eval(aligner, tasks, settings, tmp_path / "a", batch_size=6, show_progress=False, fluency=False)
    run_eval(aligner, tasks[:2], settings, tmp_path / "b", batch_size=1, show_progress=False, fluency=False)
    resumed = run_eval(aligner, tasks, settings, tmp_path / "b", batch_size=4, show_progress=False, fluency=False)
    texts = {r["task"]: r["text"] for r in together}
    assert {r["task"]: r["text"] for r in resumed} == texts
    assert len({texts[f"t0#{k}"] for k in range(3)}) > 1  # the samples of one question differ


def test_several_samples_need_sampling():
    with pytest.raises(LinalignError, match="temperature"):
        EvalSettings(suite="test", model="tiny", methods=["la"], samples=3).decode()
    with pytest.raises(LinalignError, match="samples"):
        EvalSettings(suite="test", model="tiny", methods=["la"], samples=0, temperature=0.7).decode()


def test_judge_runs_resume_and_count(tiny, tmp_path):
    aligner = Aligner(tiny)
    settings = EvalSettings(suite="test", model="tiny", methods=["base", "prompt"], max_new_tokens=3)
    records = run_eval(aligner, _tasks(), settings, tmp_path, show_progress=False, fluency=False)
    calls = []

    def judge(prompts):
        calls.append(len(prompts))
        return ["A"] * len(prompts)

    result = judge_runs(records, _tasks(), "base", "prompt", judge, tmp_path, batch_size=2)
    assert result == {"win": 0, "loss": 0, "tie": 4, "win_rate": 0.5}
    assert calls == [4, 4]
    assert judge_runs(records, _tasks(), "base", "prompt", judge, tmp_path) == result and calls == [4, 4]
    with pytest.raises(LinalignError, match="no results for run"):
        judge_runs(records, _tasks(), "la ratio=2", "prompt", judge, tmp_path)


def test_reports_and_plot(tmp_path):
    records = [
        {
            "run": label,
            "method": m,
            "ratio": r,
            "task": f"t{i}",
            "group": "g",
            "text": "x",
            "new_tokens": 3,
            "finish_reason": "stop",
            "score": i < k,
            "perplexity": 5.0 + r if r else 5.0,
            "distinct2": 1.0,
            "repeat4": 0.0,
            "reward": None,
        }
        for label, m, r, k in [
            ("prompt", "prompt", 0.0, 1),
            ("la ratio=1", "la", 1.0, 2),
            ("la ratio=4", "la", 4.0, 3),
        ]
        for i in range(4)
    ]
    summary = write_reports(
        tmp_path, records, "test", {"la ratio=1 vs prompt ratio=0": {"win": 2, "loss": 1, "tie": 1, "win_rate": 0.625}}
    )
    assert summary["runs"]["la ratio=4"]["score"] == 0.75
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    report = (tmp_path / "report.md").read_text()
    assert "| la ratio=1 | 4 | 0.500 |" in report and "win rate 0.625" in report
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert summarise([])["runs"] == {}


def test_small_real_run_on_the_principles_suite(smollm2, tmp_path):
    """The built-in model on two principles x three questions, through the CLI."""
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--suite",
            "principles",
            "--only",
            "lowercase,no_commas",
            "--limit",
            "3",
            "--methods",
            "prompt,la",
            "--ratios",
            "0.5,2",
            "--max-new-tokens",
            "24",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"prompt", "la ratio=0.5 dry=2", "la ratio=2 dry=2"}  # the default preset
    assert all(r["n"] == 6 for r in summary["runs"].values())
    assert (tmp_path / "sweep.png").exists() and (tmp_path / "report.md").exists()
    assert len(build_tasks("principles", limit=3, only=["lowercase", "no_commas"])) == 6


def test_runner_combines_extra_principles_in_linear_alignment(tiny, tmp_path):
    aligner = Aligner(tiny)
    extra = "Write a long and detailed answer."
    settings = EvalSettings(
        suite="test",
        model="tiny",
        methods=["prompt", "la"],
        ratios=[1.0],
        max_new_tokens=5,
        extra_principles=[extra],
        extra_weights=[-1.0],
    )
    records = run_eval(aligner, _tasks()[:2], settings, tmp_path, show_progress=False, fluency=False)
    assert {r["run"] for r in records} == {"prompt", "la ratio=1 weights=1,-1 dry=2"}
    from linalign import AlignConfig, DecodeConfig

    direct = aligner.generate(
        [t.prompt for t in _tasks()[:2]],
        AlignConfig(method="la", principles=[_tasks()[0].principle, extra], weights=[1.0, -1.0], ratio=1.0),
        DecodeConfig(max_new_tokens=5),
    )
    assert [r["text"] for r in records if r["method"] == "la"] == [g.text for g in direct]


def test_judges_are_real_models_local_and_behind_an_endpoint(tiny, tmp_path, monkeypatch):
    """A local judge and an OpenAI-compatible endpoint judge (linalign's own server) reply the same."""
    from linalign.evaluation.judges import endpoint_judge, local_judge
    from linalign.serve.app import create_app
    from linalign.serve.server import serving

    prompts = ["Which is better, A or B? Reply A or B.", "Say T."]
    local = local_judge(tiny.name)(prompts)
    monkeypatch.setenv("JUDGE_KEY", "secret")
    with serving(create_app(Aligner(tiny), api_key="secret")) as url:
        remote = endpoint_judge(url, "tiny", api_key_env="JUDGE_KEY")(prompts)
    assert remote == local and all(isinstance(r, str) for r in remote)


def test_reward_model_scores_each_pair(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from linalign.evaluation.judges import RewardModel

    config = LlamaConfig(
        vocab_size=len(tiny.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tiny.tokenizer.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    scorer = RewardModel(str(tmp_path))
    batched = scorer.score(["Hi?", "What is two plus two?"], ["Hello.", "Four, because two and two make four."])
    alone = [
        scorer.score([q], [a])[0]
        for q, a in [("Hi?", "Hello."), ("What is two plus two?", "Four, because two and two make four.")]
    ]
    assert batched == pytest.approx(alone, abs=1e-4) and batched[0] != batched[1]
    with pytest.raises(LinalignError, match="could not load reward model"):
        RewardModel(str(tmp_path / "missing"))
