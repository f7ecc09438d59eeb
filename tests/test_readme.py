"""Every snippet of the README runs: the Python ones as written (the server's against a live server), the
`linalign generate` ones with the models they name replaced by the tiny test models and few tokens."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linalign import Aligner
from linalign.cli import app
from linalign.serve import create_app
from linalign.serve.server import serving

README = (Path(__file__).parent.parent / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[tuple[str | None, list[str]]]:
    """(stdin, argv) of every `linalign generate` command in the bash blocks."""
    found = []
    for block in blocks("bash"):
        lines = re.sub(r"\\\n\s*", " ", block).splitlines()
        for line in lines:
            line = line.split("  #")[0].strip()
            stdin = None
            if line.startswith("echo "):
                echoed, _, line = line.partition("|")
                stdin = shlex.split(echoed)[1] + "\n"
                line = line.strip()
            if line.startswith("linalign generate"):
                found.append((stdin, shlex.split(line)[2:]))
    return found


def test_the_readme_has_the_snippets_this_file_runs():
    assert len(blocks("python")) >= 3 and len(commands()) >= 6


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippets_run(index, smollm2, capsys):
    code = blocks("python")[index]
    if "OpenAI(base_url=" in code:
        with serving(create_app(Aligner(smollm2))) as url:
            exec(compile(code.replace("http://127.0.0.1:8000/v1", url), "README", "exec"), {})
    else:
        exec(compile(code, "README", "exec"), {})
    assert capsys.readouterr().out.strip()


def _substituted(argv: list[str], tiny: str, other: str) -> list[str]:
    out, values = [], {"--model": tiny, "--ref-model": other, "--device": "cpu", "--max-new-tokens": "3"}
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in values:
            out += [arg, values.pop(arg)]
            skip = i + 1 < len(argv)
            continue
        out.append(arg)
    return [*out, *(x for pair in values.items() if pair[0] != "--ref-model" for x in pair)]


@pytest.mark.parametrize("index", range(len(commands())))
def test_cli_examples_run(index, tiny, tiny_other):
    stdin, argv = commands()[index]
    result = CliRunner().invoke(app, ["generate", *_substituted(argv, tiny.name, tiny_other.name)], input=stdin)
    assert result.exit_code == 0, result.output
