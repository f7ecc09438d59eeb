"""Every snippet of the README runs: the Python ones as written (the server's against a live server), the
`linalign generate` ones with the models they name replaced by the tiny test models and few tokens. Where the
README says what an example prints (its `# →` lines; `…` stands for any text), the example runs on the built-in
model and the default backend, as a new user runs it, and prints that."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

import linalign
from linalign import Aligner
from linalign.cli import app
from linalign.params import ALIGN, DECODE, METHOD, METHODS, Knob
from linalign.serve import create_app
from linalign.serve.schemas import ChatCompletionRequest
from linalign.serve.server import serving

README = (Path(__file__).parent.parent / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands() -> list[tuple[str | None, list[str], dict[str, list[str]]]]:
    """(stdin, argv, expected answers by method) of every `linalign generate` command in the bash blocks; the
    answers are the `# → method: answer | answer` lines under a command."""
    found = []
    for block in blocks("bash"):
        lines = re.sub(r"\\\n\s*", " ", block).splitlines()
        for line in lines:
            if line.startswith("# → ") and found:
                method, _, answers = line.removeprefix("# → ").partition(": ")
                found[-1][2][method] = answers.split(" | ")
                continue
            line = line.split("  #")[0].strip()
            stdin = None
            if line.startswith("echo "):
                echoed, _, line = line.partition("|")
                stdin = shlex.split(echoed)[1] + "\n"
                line = line.strip()
            if line.startswith("linalign generate"):
                found.append((stdin, shlex.split(line)[2:], {}))
    return found


def printed(code: str) -> list[str]:
    """What a Python snippet says it prints: its `# →` comments, in order."""
    return [line.split("# → ", 1)[1] for line in code.splitlines() if "# → " in line]


def matches(expected: str, actual: str) -> bool:
    """`…` stands for any text (or none)."""
    return re.fullmatch(".*".join(re.escape(part.strip()) for part in expected.split("…")), actual.strip()) is not None


def test_the_readme_has_the_snippets_this_file_runs():
    assert len(blocks("python")) >= 3 and len(commands()) >= 6
    assert all(printed(code) for code in blocks("python")), "every Python snippet says what it prints"
    assert sum(bool(expected) for *_, expected in commands()) >= 2


def test_the_wildcard():
    assert matches("In a small town, …", "In a small town, there was")
    assert matches("b …", "b 'Paris.' stop") and matches("Paris", " Paris ")
    assert not matches("Paris", "Paris is the capital") and not matches("a 'grape' stop", "a 'Grape' stop")


def _default(knob: Knob) -> str:
    if knob.default is None:
        return "unset"
    if isinstance(knob.default, tuple):
        return " ".join(f"`{x!r}`" for x in knob.default) or "none"
    return f"`{knob.default!r}`"


def _row(knob: Knob, config: str, server: str) -> str:
    cli = " ".join(f"`{flag}`" for flag in knob.cli_flags) if knob.cli else "–"
    methods = "all" if knob.methods == METHODS else ", ".join(knob.methods)
    return f"| {cli} | `{config}.{knob.name}` | {server} | {_default(knob)} | {methods} | {knob.help} |"


def options_table() -> str:
    """The README's table of options as the declarations in `linalign.params` and the server's schema make it: the
    alignment knobs in the request's `linalign` object, the decoding knobs among OpenAI's fields where served."""
    served = ChatCompletionRequest.model_fields
    rows = [_row(k, "AlignConfig", f"`linalign.{k.name}`") for k in (METHOD, *ALIGN)]
    for k in DECODE:
        name = k.request or k.name
        rows.append(_row(k, "DecodeConfig", f"`{name}`" if name in served else "–"))
    head = "| command line | Python | server | default | methods | what it does |\n|---|---|---|---|---|---|"
    return "\n".join([head, *rows])


def test_the_options_table_is_the_spec():
    assert options_table() in README, "the README's table of options, as linalign.params declares them:\n" + (
        options_table()
    )


def test_the_map_of_the_code_names_every_module():
    """'How it is built' lists every module and folder of the package."""
    built = README.split("## How it is built", 1)[1].split("```")[1]
    root = Path(linalign.__file__).parent
    names = {p.name for p in root.glob("*.py")} | {p.name for p in root.glob("*/*.py")}
    names |= {f"{p.name}/" for p in root.iterdir() if p.is_dir() and not p.name.startswith("__")}
    names -= {"__init__.py"}
    listed = set(re.findall(r"^\s+(\S+)", built, flags=re.M))
    assert names <= listed, sorted(names - listed)


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_links_between_the_readme_and_docs_arrive():
    """Every relative link of the README and docs/ names a file that exists, and a heading of it where it has an
    anchor: sections moved between them must take their links along."""
    root = Path(__file__).parent.parent
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            if "://" in target:
                continue
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), (page.name, target)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                assert anchor in map(_slug, headings), (page.name, target)


@pytest.fixture(scope="module")
def default_aligner() -> Aligner:
    """The built-in model on the default backend, as `linalign serve` loads it."""
    return Aligner()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippets_print_what_the_readme_says(index, default_aligner, capsys):
    code = blocks("python")[index]
    if "OpenAI(base_url=" in code:
        with serving(create_app(default_aligner)) as url:
            exec(compile(code.replace("http://127.0.0.1:8000/v1", url), "README", "exec"), {})
    else:
        exec(compile(code, "README", "exec"), {})
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == len(printed(code)), out
    for expected, actual in zip(printed(code), lines, strict=True):
        assert matches(expected, actual), (expected, actual)
    assert "Loading weights" not in err


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i, (*_, expected) in enumerate(commands()) if expected])
def test_cli_examples_answer_what_the_readme_says(index):
    """The command as written, on the built-in model and the default backend (`--json` shows the same answers)."""
    stdin, argv, expected = commands()[index]
    result = CliRunner().invoke(app, ["generate", *argv, "--json"], input=stdin)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    for method, answers in expected.items():
        got = [r["text"] for r in records if r["method"] == method]
        assert len(got) == len(answers) and all(map(matches, answers, got)), (method, got)


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
    stdin, argv, _ = commands()[index]
    result = CliRunner().invoke(app, ["generate", *_substituted(argv, tiny.name, tiny_other.name)], input=stdin)
    assert result.exit_code == 0, result.output
