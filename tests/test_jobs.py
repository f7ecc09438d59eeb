"""The batch job on one machine: `linalign generate --input prompts.jsonl --output answers.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linalign import Aligner
from linalign.cli import app
from linalign.errors import LinalignError
from linalign.jobs import JobSettings, job_file, local_executor, plan, read_input, run_job

PRINCIPLE = "Answer in lowercase letters only."


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def questions(n: int) -> list[dict]:
    return [{"id": f"q{i}", "prompt": f"Question number {i}: name a colour.", "topic": i} for i in range(n)]


def settings_for(tiny, path: Path, **changes) -> JobSettings:
    fields = {"model": tiny.name, "methods": ["la"], "principles": [PRINCIPLE], "decode": {"max_new_tokens": 4}}
    return JobSettings(input=str(path), **(fields | changes))


@pytest.fixture
def executor(tiny):
    """The local executor over the session's tiny model (no reload per job)."""
    aligner = Aligner(tiny)

    def make(settings: JobSettings):
        from linalign.jobs import run_batch

        return lambda batches: (run_batch(aligner, settings, b) for b in batches)

    return make


def test_records_carry_the_input_and_the_result(tiny, tmp_path, executor):
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "a", "prompt": "Name a fruit.", "source": "x", "principle": "Answer like a pirate."},
            {"messages": [{"role": "user", "content": "Hello!"}], "method": "base", "max_tokens": 2},
            {"id": 7, "prompt": "Why?", "principles": [PRINCIPLE, "Be brief."], "weights": [1, -0.5], "ratio": 3},
        ],
    )
    out = tmp_path / "out.jsonl"
    settings = settings_for(tiny, source, methods=["prompt", "la"])
    summary = run_job(settings, out, executor(settings), batch_size=4, show_progress=False)
    records = lines(out)
    assert summary.written == len(records) == 5  # two methods for "a" and 7, the record's own for line 2
    by_key = {(r["id"], r["method"]): r for r in records}
    assert set(by_key) == {("a", "prompt"), ("a", "la"), (2, "base"), (7, "prompt"), (7, "la")}
    a = by_key["a", "la"]
    assert list(a)[:4] == ["id", "prompt", "source", "principle"]  # the input first, passed through
    assert a["run"] == "la ratio=2 dry=2" and a["ratio"] == 2.0 and a["new_tokens"] == 4  # the default preset
    assert {"text", "prompt_tokens", "finish_reason"} <= set(a)
    assert by_key[2, "base"]["new_tokens"] <= 2  # line number as id, the record's own budget
    assert by_key[7, "la"]["run"] == "la ratio=3 weights=1,-0.5 dry=2"
    assert by_key["a", "prompt"]["ratio"] == 0.0


def test_a_rerun_skips_what_is_written_and_repairs_a_cut_line(tiny, tmp_path, executor):
    source = write_jsonl(tmp_path / "in.jsonl", questions(6))
    out = tmp_path / "out.jsonl"
    settings = settings_for(tiny, source)
    write_jsonl(tmp_path / "first.jsonl", questions(3))
    first = settings_for(tiny, source)
    run_job(first, out, executor(first), batch_size=2, show_progress=False)
    # the same job over more of the file; an interruption left half a line behind
    written = out.read_text()
    assert len(written.splitlines()) == 6
    out.write_text("".join(written.splitlines(keepends=True)[:3]) + '{"id": "q3", "prompt": "Quest')
    summary = run_job(settings, out, executor(settings), batch_size=4, show_progress=False)
    assert (summary.already, summary.written) == (3, 3)
    assert out.read_text().startswith("".join(written.splitlines(keepends=True)[:3]))
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == [f"q{i}" for i in range(6)]
    # the records written after the resume are those of a fresh run (tiny model: batching does not matter)
    assert sorted(out.read_text().splitlines()) == sorted(written.splitlines())
    again = run_job(settings, out, executor(settings), batch_size=4, show_progress=False)
    assert (again.written, again.already) == (0, 6)


def test_malformed_lines_are_reported_with_their_number_and_skipped(tiny, tmp_path, executor):
    long_prompt = "word " * 600  # beyond the tiny model's 512 positions: refused when the model tokenises it
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"id": "ok1", "prompt": "Fine."},
            "{not json",
            '["a list"]',
            {"id": "ok1", "prompt": "Duplicate id."},
            {"id": "r", "prompt": "Negative ratio.", "ratio": -1},
            {"id": "m", "prompt": "Unknown method.", "method": "magic"},
            {"id": "both", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
            {"id": "none"},
            {"id": "long", "prompt": long_prompt},
            {"id": "ok2", "prompt": "Also fine.", "max_tokens": 0},
            {"id": "ok3", "prompt": "Fine too."},
        ],
    )
    out = tmp_path / "out.jsonl"
    reported: list[str] = []
    settings = settings_for(tiny, source)
    summary = run_job(settings, out, executor(settings), report=reported.append, show_progress=False)
    assert [r["id"] for r in lines(out)] == ["ok1", "ok3"]
    assert (summary.malformed, summary.failed) == (8, 1)
    numbers = [int(m.split(" line ")[1].split(":")[0]) for m in reported]
    assert numbers == [2, 3, 4, 5, 6, 7, 8, 10, 9]  # input problems first, then the record the model refused
    text = "\n".join(reported)
    for expected in ("bad JSON", "expected a JSON object", 'duplicate id "ok1" (first on line 1)', "ratio must be"):
        assert expected in text
    assert "unknown method 'magic'" in text and "exactly one" in text and "max_new_tokens" in text
    assert "context" in reported[-1]


def test_another_jobs_output_is_refused(tiny, tmp_path, executor):
    source = write_jsonl(tmp_path / "in.jsonl", questions(2))
    out = tmp_path / "out.jsonl"
    settings = settings_for(tiny, source)
    run_job(settings, out, executor(settings), show_progress=False)
    before = out.read_text()
    changed = settings_for(tiny, source, knobs={"ratio": 4.0})
    with pytest.raises(LinalignError, match=r"other settings \(knobs.ratio differ\)"):
        run_job(changed, out, executor(changed), show_progress=False)
    other_input = settings_for(tiny, write_jsonl(tmp_path / "other.jsonl", questions(2)))
    with pytest.raises(LinalignError, match="input differ"):
        run_job(other_input, out, executor(other_input), show_progress=False)
    assert out.read_text() == before
    # a method added to the same job is work still to do, not another job
    more = settings_for(tiny, source, methods=["la", "base"])
    assert run_job(more, out, executor(more), show_progress=False).written == 2
    assert json.loads(job_file(out).read_text())["methods"] == ["la", "base"]
    foreign = write_jsonl(tmp_path / "foreign.jsonl", [{"id": "q0", "method": "la", "text": "from elsewhere"}])
    with pytest.raises(LinalignError, match="did not write"):
        run_job(settings, foreign, executor(settings), show_progress=False)


def test_batches_share_one_call_and_keep_the_input_order(tiny, tmp_path):
    rows = questions(5)
    rows[1]["max_tokens"] = 2
    rows[3]["ratio"] = 5
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    settings = settings_for(tiny, source, methods=["prompt", "la"])
    items, problems = read_input(source, settings)
    assert not problems and len(items) == 10
    batches = plan(settings, items, 2)
    assert [[(i["id"], i["method"]) for i in b] for b in batches] == [
        [("q0", "prompt"), ("q2", "prompt")],  # full batches as they fill up
        [("q0", "la"), ("q2", "la")],
        [("q4", "prompt")],  # then the partial ones, in the order their first record came
        [("q4", "la")],
        [("q1", "prompt")],
        [("q1", "la")],
        [("q3", "prompt")],
        [("q3", "la")],
    ]
    with pytest.raises(LinalignError, match="batch size"):
        plan(settings, items, 0)


def test_samples_do_not_depend_on_the_batching(tiny, tmp_path, executor):
    source = write_jsonl(tmp_path / "in.jsonl", [*questions(3), {"id": "own", "prompt": "Hi.", "seed": 5}])
    decode = {"max_new_tokens": 6, "temperature": 1.0, "seed": 11}
    settings = settings_for(tiny, source, decode=decode)
    texts = []
    for size in (1, 4):
        out = tmp_path / f"out{size}.jsonl"
        run_job(settings, out, executor(settings), batch_size=size, show_progress=False)
        texts.append({r["id"]: r["text"] for r in lines(out)})
    assert texts[0] == texts[1]


def test_the_command_line_runs_a_job_and_refuses_what_does_not_fit(tiny, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [*questions(3), "oops"])
    out = tmp_path / "answers.jsonl"
    base = ["generate", "--input", str(source), "--model", tiny.name, "--method", "la", "-p", PRINCIPLE]
    result = CliRunner().invoke(app, [*base, "--output", str(out), "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "line 4: bad JSON" in result.output and "1 malformed input lines skipped" in result.output
    assert [r["id"] for r in lines(out)] == ["q0", "q1", "q2"]
    for extra, message in [
        ([], "needs --output"),
        (["--output", str(out), "--replicas", "2"], "add --ray"),
        (["--output", str(out), "What?"], "one of them"),
        (["--output", str(source)], "must not be the input"),
        (["--output", str(tmp_path / "o2.jsonl"), "--batch-size", "0"], "batch size"),
    ]:
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    for option, run in (["--dry-multiplier", "0.8"], "la ratio=2 dry=0.8"), (["--preset", "paper"], "la ratio=2"):
        done = CliRunner().invoke(app, [*base, "--output", str(tmp_path / f"{run}.jsonl"), *option])
        assert done.exit_code == 0, done.output  # like every option of generate, they reach the job
        assert {r["run"] for r in lines(tmp_path / f"{run}.jsonl")} == {run}
    result = CliRunner().invoke(app, ["generate", "Hi", "--output", str(out)])
    assert result.exit_code == 2 and "--input" in result.output
    missing = CliRunner().invoke(app, ["generate", "--input", str(tmp_path / "nope.jsonl"), "--output", str(out)])
    assert missing.exit_code == 2 and "does not exist" in " ".join(missing.output.split())


@pytest.mark.parametrize("command", [["serve"], ["eval"], ["generate", "--input", "in.jsonl", "--output", "o.jsonl"]])
def test_ray_with_an_address_points_to_ray_address(command):
    """`--ray HOST:PORT` is refused before anything starts, with the option that takes the address."""
    result = CliRunner().invoke(app, [*command, "--ray", "10.0.0.5:6379", "--replicas", "2"])
    assert result.exit_code == 2 and "--ray-address HOST:PORT joins one" in " ".join(result.output.split())


def test_the_local_executor_loads_the_model_only_for_work(tiny, tmp_path):
    settings = settings_for(tiny, tmp_path / "in.jsonl", model=str(tmp_path / "no-such-model"))
    assert list(local_executor(settings)([])) == []  # nothing to do: nothing loaded
    with pytest.raises(LinalignError, match="no such directory"):
        list(local_executor(settings)([[{"line": 1, "id": 1, "method": "la", "record": {"prompt": "x"}}]]))
