"""Bad input gets one clear sentence naming the value and the rule, before any model work."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from linalign import AlignConfig, Aligner, DecodeConfig, LinalignError
from linalign.cli import app
from linalign.engine import check_same_vocabulary
from linalign.models import load_model

runner = CliRunner()


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"ratio": float("nan")}, "ratio must be a finite number"),
        ({"ratio": float("inf")}, "ratio must be a finite number"),
        ({"ratio": -1.0}, "ratio must be >= 0"),
        ({"lam": float("nan")}, "lam must be a finite number"),
        ({"method": "cfg"}, "unknown method 'cfg'"),
        ({"principles": []}, "needs a principle"),
        ({"principles": ["Be brief.", " "]}, "principle 2 is blank"),
        ({"plausibility_top_p": 1.5}, "plausibility_top_p must be in [0, 1]"),
        ({"principles": ["a", "b"], "weights": [1.0]}, "got 1 weights for 2 principles"),
        ({"principles": ["a"], "weights": [float("inf")]}, "weight must be a finite number"),
    ],
)
def test_align_config_errors(kwargs, needle):
    settings = {"method": "la", "principles": ["Be brief."], **kwargs}
    with pytest.raises(LinalignError) as err:
        AlignConfig(**settings)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"seed": 2**63}, "seed must be an integer in [0, 9223372036854775808)"),
        ({"seed": -1}, "seed must be an integer in"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.2}, "top_p must be in (0, 1]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens must be between"),
        ({"top_k": -3}, "top_k must be an integer >= 0"),
    ],
)
def test_decode_config_errors(kwargs, needle):
    with pytest.raises(LinalignError) as err:
        DecodeConfig(**kwargs)
    assert needle in str(err.value)


def test_empty_prompt_and_bad_message_list(tiny):
    aligner = Aligner(tiny)
    with pytest.raises(LinalignError, match="prompt is empty"):
        aligner.generate(["  "])
    with pytest.raises(LinalignError, match="message 0 must be an object"):
        aligner.generate([[{"role": "robot", "content": "hi"}]])


def test_questions_are_never_parsed_as_json(tiny):
    """A question that happens to look like a JSON list is a question."""
    aligner = Aligner(tiny)
    for question in ("[INST] hi [/INST]", "[1, 2]", '[{"role": "user", "content": "hi"}]'):
        prepared = aligner.prepare(question, AlignConfig(method="base"), DecodeConfig(max_new_tokens=2))
        assert question in tiny.tokenizer.decode(prepared.term_ids[0])


def test_sampling_rule():
    """Greedy unless temperature > 0; top_p, top_k and seed shape sampling only."""
    greedy = DecodeConfig(top_p=0.5, top_k=3, seed=7)
    assert not greedy.do_sample and (greedy.top_p, greedy.top_k, greedy.seed) == (1.0, 0, None)
    assert greedy.mask_temperature == 1.0
    sampled = DecodeConfig(temperature=0.5, top_p=0.5, seed=7)
    assert sampled.do_sample and sampled.mask_temperature == 0.5 and sampled.seed == 7
    assert not DecodeConfig(temperature=0.0).do_sample


def test_prompt_longer_than_context(tiny):
    with pytest.raises(LinalignError, match="exceeds the model's context of 512 tokens"):
        Aligner(tiny).generate(["hello " * 400], config=DecodeConfig(max_new_tokens=200))


def test_dera_without_reference(tiny):
    with pytest.raises(LinalignError, match="needs a reference model"):
        Aligner(tiny).generate(["hi"], AlignConfig(method="dera", lam=0.5))


def test_vocabulary_mismatch_is_refused(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    small.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(LinalignError, match="vocabulary mismatch"):
        check_same_vocabulary(tiny, load_model(str(tmp_path)))


def test_unknown_model_paths(tmp_path, monkeypatch):
    with pytest.raises(LinalignError, match="no such directory: '/nonexistent/model'"):
        load_model("/nonexistent/model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LinalignError, match="no such directory: 'aligned/'"):
        load_model("aligned/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LinalignError, match="no config.json"):
        load_model("empty")
    with pytest.raises(LinalignError, match="does not exist"):
        load_model("missing.gguf")
    with pytest.raises(LinalignError, match="unknown dtype"):
        load_model(None, dtype="float8")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["hi", "-p", "x", "--ratio", "nan"], "ratio must be a finite number"),
        (["hi", "-p", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["hi", "-p", "Be brief.", "-p", " ", "--weight", "2", "--weight", "1"], "principle 2 is blank"),
        (["hi", "-p", "x", "--seed", "-3", "--temperature", "1"], "seed must be an integer"),
        (["--messages", "/no/such/file.jsonl", "-p", "x"], "does not exist"),
        (["hi", "--messages", "-", "-p", "x"], "not both"),
        (["hi", "-p", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["hi", "-p", "x", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["", "-p", "x"], "prompt is empty"),
        (["hi", "-p", "x", "--method", "la,nope"], "unknown method 'nope'"),
        (["hi", "--method", "dera"], "needs --ref-model"),
        (["hi", "--method", "base", "--model", "/no/such/dir"], "no such directory"),
    ],
)
def test_cli_bad_input_exits_2_with_message(args, needle):
    result = runner.invoke(app, ["generate", *args])
    assert result.exit_code == 2
    assert needle in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_cli_json_lines(tiny):
    result = runner.invoke(
        app,
        [
            "generate",
            "What is 2+2?",
            "Say hi.",
            "-p",
            "Be brief.",
            "--method",
            "base,la",
            "--model",
            tiny.name,
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["prompt"], r["method"]) for r in records] == [
        ("What is 2+2?", "base"),
        ("Say hi.", "base"),
        ("What is 2+2?", "la"),
        ("Say hi.", "la"),
    ]
    for r in records:
        assert {"prompt", "method", "ratio", "text", "new_tokens", "seconds"} <= r.keys()
        assert r["new_tokens"] == 4
    assert records[2]["ratio"] == 2.0


def test_cli_dera_json_reports_lam(tiny, tiny_other):
    result = runner.invoke(
        app,
        [
            "generate",
            "Hi",
            "--method",
            "dera",
            "--lam",
            "0.5",
            "--model",
            tiny.name,
            "--ref-model",
            tiny_other.name,
            "--max-new-tokens",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[-1])
    assert record["lam"] == 0.5 and "ratio" not in record


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"amulet_iterations": -1}, "amulet_iterations must be an integer >= 0"),
        ({"amulet_eta": 0.0}, "amulet_eta must be > 0"),
        ({"amulet_alpha": float("nan")}, "amulet_alpha must be a finite number"),
        ({"amulet_lambda": -2.0}, "amulet_lambda must be > 0"),
        ({"principles": ["a", "b"]}, "method 'amulet' takes one principle"),
    ],
)
def test_amulet_parameter_errors(kwargs, needle):
    with pytest.raises(LinalignError) as err:
        AlignConfig(**{"method": "amulet", "principles": ["Be brief."], **kwargs})
    assert needle in str(err.value)


def test_offline_hub_id_fails_fast_with_one_sentence(monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "https://unreachable.invalid")
    start = time.monotonic()
    with pytest.raises(LinalignError, match="hub is not reachable and it is not in the local cache"):
        load_model("someone/no-such-model")
    assert time.monotonic() - start < 10


def _cli_json(args: list[str], stdin: str | None = None) -> list[dict]:
    result = runner.invoke(app, ["generate", *args, "--json"], input=stdin)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_cli_system_stdin_and_messages_file(tiny, tmp_path):
    """Questions from stdin, a base --system prompt, and conversations from --messages equal the API's output."""
    aligner = Aligner(tiny)
    common = ["-p", "Be brief.", "--method", "la", "--model", tiny.name, "--max-new-tokens", "5"]
    align = AlignConfig(method="la", principles=["Be brief."])
    records = _cli_json(["-", "--system", "You are kind.", *common], stdin="What is 2+2?\n\nSay hi.\n")
    direct = aligner.generate(
        ["What is 2+2?", "Say hi."], align, DecodeConfig(max_new_tokens=5), system="You are kind."
    )
    assert [r["text"] for r in records] == [g.text for g in direct]
    conversation = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "[1, 2] is a list?"},
    ]
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(conversation) + "\n" + json.dumps({"messages": conversation[:1]}) + "\n")
    records = _cli_json(["--messages", str(path), *common])
    direct = aligner.generate([conversation, conversation[:1]], align, DecodeConfig(max_new_tokens=5))
    assert [r["text"] for r in records] == [g.text for g in direct]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conversation) + "\n{oops\n")
    result = runner.invoke(app, ["generate", "--messages", str(bad), *common])
    assert result.exit_code == 2 and "line 2 is not valid JSON" in " ".join(result.output.split())


def test_cli_records_state_what_was_decoded(tiny):
    """--weight scales --ratio, and the record states both, so it says exactly what was decoded."""
    common = ["hi", "-p", "Be brief.", "--method", "la", "--model", tiny.name, "--max-new-tokens", "4"]
    weighted = _cli_json([*common, "--weight", "0.5", "--ratio", "3"])[0]
    assert weighted["ratio"] == 3.0 and weighted["weights"] == [0.5]
    plain_ratio = _cli_json([*common, "--ratio", "1"])[0]
    assert weighted["text"] == plain_ratio["text"]  # c = 0.5 (1 + 3) = 1 + 1


def test_cli_stop_reads_c_escapes(tiny):
    from linalign.resolve import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb") == "a\tb" and unescape("café") == "café"
    assert unescape(r"\\n") == "\\n"


@pytest.mark.parametrize(
    "args,first_line",
    [
        (["generate", "hi", "--min-pp", "3"], "error: No such option: --min-pp"),
        (["generate", "hi", "--ratio", "abc"], "error: Invalid value for '--ratio'"),
        (["eval", "--ratios", "x"], "error: --ratios must be comma-separated numbers, got 'x'"),
        (["nosuch"], "error: No such command 'nosuch'"),
    ],
)
def test_every_error_is_one_line_starting_error(args, first_line):
    """Usage errors found while parsing read as the engine's errors do: one line, 'error: ', exit code 2."""
    result = runner.invoke(app, args, terminal_width=60)
    assert result.exit_code == 2
    assert result.output.startswith(first_line) and result.output.count("\n") == 1, result.output
    assert ("--help" in result.output) == (args[0] != "eval") and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "hi", "-p", "x", "--mask", "min_p", "--plausibility-min-p", "2"], "plausibility_min_p must be"),
        (["generate", "hi", "-p", "x", "--mask", "min_p", "--min-p", "2"], "plausibility_min_p must be"),
        (["generate", "hi", "-p", "x", "--methods", "la,nope"], "unknown method 'nope'"),
        (["eval", "--method", "la,nope"], "unknown method 'nope'"),
        (["eval", "--ratio", "1,x"], "--ratios must be comma-separated numbers, got '1,x'"),
        (["eval", "--lam", "y"], "--lams must be comma-separated numbers, got 'y'"),
    ],
)
def test_one_name_per_option_and_both_spellings_of_lists(args, needle):
    """--plausibility-min-p is AlignConfig's name (--min-p stays); eval's lists take the singular too."""
    result = runner.invoke(app, args, terminal_width=60)
    assert result.exit_code == 2 and needle in result.output, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1


def test_eval_prints_its_paths_unwrapped(tiny, tmp_path):
    out = tmp_path / ("a-results-directory-whose-path-is-long-enough-to-wrap-at-eighty-columns" * 2)
    data = tmp_path / "questions.jsonl"
    data.write_text('{"question": "Hi"}\n')
    args = ["eval", "--suite", "files", "--file", str(data), "-p", "Be brief.", "--methods", "prompt"]
    args += ["--model", tiny.name, "--max-new-tokens", "2", "--no-fluency", "--out", str(out)]
    result = runner.invoke(app, args, terminal_width=80)
    assert result.exit_code == 0, result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith(f"report: {out / 'report.md'}"), result.output[-600:]
