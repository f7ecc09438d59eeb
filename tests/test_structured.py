"""The structured-output suite: its tasks and the deterministic checkers that score validity and the count."""

from __future__ import annotations

import json

from linalign.evaluation import checkers
from linalign.evaluation.suites import build_tasks

FRUITS = [
    {"name": "apple", "colour": "red"},
    {"name": "banana", "colour": "yellow"},
    {"name": "kiwi", "colour": "brown"},
]


def test_the_suite_has_every_format_under_every_principle():
    tasks = build_tasks("structured")
    assert len(tasks) >= 40 and len({t.id for t in tasks}) == len(tasks)
    groups = {t.group for t in tasks}
    assert groups == {"json_list", "numbered_list", "markdown_table", "csv", "python"}
    assert len({t.principle for t in tasks}) == 3
    for group in groups:
        assert len({t.principle for t in tasks if t.group == group}) == 3
    assert all(t.check in checkers.CHECKERS for t in tasks)
    limited = build_tasks("structured", limit=2)
    assert len(limited) == 10 and all(sum(t.group == g for t in limited) == 2 for g in groups)


def test_json_list():
    ok = json.dumps(FRUITS)
    params = {"n": 3, "keys": ["name", "colour"]}
    assert checkers.check("json_list", ok, params)
    assert checkers.check("json_list", f"Here you go:\n```json\n{json.dumps(FRUITS, indent=2)}\n```\nEnjoy!", params)
    assert not checkers.check("json_list", json.dumps(FRUITS[:2]), params)  # the count
    assert not checkers.check("json_list", ok[:-1], params)  # cut short: not JSON
    assert not checkers.check("json_list", ok.replace('"colour"', '"color"'), params)  # a key renamed
    extra = [dict(f, taste="sweet") for f in FRUITS]
    assert not checkers.check("json_list", json.dumps(extra), params)  # a key too many
    assert not checkers.check("json_list", json.dumps([dict(FRUITS[0], colour="")] + FRUITS[1:]), params)
    assert not checkers.check("json_list", '{"name": "apple", "colour": "red"}', params)  # not a list
    assert not checkers.check("json_list", "", params)


def test_numbered_items():
    assert checkers.check("numbered_items", "1. apple\n2. banana\n3. kiwi", {"n": 3})
    assert checkers.check("numbered_items", "Three fruits:\n1) apple\n2) banana\n3) kiwi\nThat's all.", {"n": 3})
    assert not checkers.check("numbered_items", "1. apple\n2. banana", {"n": 3})
    assert not checkers.check("numbered_items", "1. apple\n2. banana\n3. kiwi\n4. plum", {"n": 3})
    assert not checkers.check("numbered_items", "1. apple\n3. banana\n2. kiwi", {"n": 3})
    assert not checkers.check("numbered_items", "- apple\n- banana\n- kiwi", {"n": 3})


TABLE = "| Name | Colour |\n|---|:---:|\n| apple | red |\n| banana | yellow |\n| kiwi | brown |"


def test_markdown_table():
    params = {"n": 3, "columns": ["name", "colour"]}
    assert checkers.check("markdown_table", TABLE, params)
    assert checkers.check("markdown_table", f"Sure!\n\n{TABLE}\n\nThese are fruits.", params)
    assert not checkers.check("markdown_table", TABLE.rsplit("\n", 1)[0], params)  # two rows
    assert not checkers.check("markdown_table", TABLE.replace("|---|:---:|\n", ""), params)  # no rule row
    assert not checkers.check("markdown_table", TABLE.replace("| kiwi | brown |", "| kiwi |  |"), params)
    assert not checkers.check("markdown_table", TABLE.replace("Colour", "Taste"), params)
    assert not checkers.check("markdown_table", "name, colour\napple, red", params)


def test_csv_rows():
    params = {"n": 3, "header": ["name", "colour"]}
    block = "name,colour\napple,red\nbanana,yellow\nkiwi,brown"
    assert checkers.check("csv_rows", block, params)
    assert checkers.check("csv_rows", f"Here is the CSV:\n```csv\n{block}\n```", params)
    assert checkers.check("csv_rows", 'Name, Colour\n"apple, green",green\nbanana,yellow\nkiwi,brown', params)
    assert not checkers.check("csv_rows", block + "\nplum,purple", params)  # four rows
    assert not checkers.check("csv_rows", block.replace("kiwi,brown", "kiwi"), params)
    assert not checkers.check("csv_rows", block.replace("name,colour\n", ""), params)  # no header


def test_python_function():
    params = {"name": "sum_list", "n": 1}
    code = "def sum_list(numbers):\n    total = 0\n    for x in numbers:\n        total += x\n    return total\n"
    assert checkers.check("python_function", code, params)
    assert checkers.check("python_function", f"Here it is:\n```python\n{code}```\nIt loops once.", params)
    assert not checkers.check("python_function", "def sum_list(numbers):\n    return sum(numbers)\n", params)
    assert not checkers.check("python_function", code.replace("(numbers)", "(numbers, start)"), params)
    assert not checkers.check("python_function", code.replace("sum_list", "add_all"), params)
    assert not checkers.check("python_function", code.replace("    return total", "  return total"), params)
    assert not checkers.check("python_function", f"Here it is: {code}", params)  # prose, no fence: no parse


def test_eval_runs_the_suite(tiny, tmp_path):
    from typer.testing import CliRunner

    from linalign.cli import app

    args = ["eval", "--suite", "structured", "--model", tiny.name, "--limit", "1", "--methods", "prompt,la"]
    args += ["--max-new-tokens", "4", "--no-fluency", "--out", str(tmp_path), "--variant", "dry_multiplier=0.8"]
    args += ["--preset", "paper"]  # the rule's reference is the paper's recipe
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"prompt", "la ratio=2", "la ratio=2 dry=0.8"}
    for run in summary["runs"].values():
        assert run["n"] == 5 and set(run["by_group"]) == {
            "json_list",
            "numbered_list",
            "markdown_table",
            "csv",
            "python",
        }
        assert run["score"] == 0.0  # four tokens hold no complete structure
