"""The benchmark's rows, on a tiny random-weight model (speed is measured by running it, not by tests)."""

from __future__ import annotations

from typer.testing import CliRunner

from linalign.bench import run_benchmark
from linalign.cli import app


def test_options_are_priced_as_rows_of_their_own():
    report = run_benchmark(
        batches=(2,),
        new_tokens=4,
        repeats=1,
        random_init="tiny",
        methods=("linalign", "linalign-options"),
        options={"repeat_guard": 4, "mask": "min_p"},
    )
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"generate", "linalign", "linalign-options"}
    assert all(r["tokens_per_s"] > 0 and r["batch"] == 2 for r in rows.values())
    assert report["options"] == {"repeat_guard": 4, "mask": "min_p"}
    (row,) = report["invariance"]["transformers"]  # the batch-invariant configuration priced against the stock one
    assert row["batch"] == 2 and all(
        row[f"{k}_tokens_per_s_{c}"] > 0 for k in ("prefill", "decode") for c in ("invariant", "stock")
    )


def test_bad_options_are_refused_before_anything_loads():
    result = CliRunner().invoke(app, ["bench", "--options", "repeat_guard=1"])
    assert result.exit_code == 2 and "repeat_guard" in result.output
    result = CliRunner().invoke(app, ["bench", "--options", "guard=4"])
    assert result.exit_code == 2 and "options are ratio=" in result.output
