"""One declaration per knob (`linalign.params`): the configurations, the command line, the server's schema and
eval's variants all come from it, and a new knob declared once appears in each."""

from __future__ import annotations

import json

import pydantic
import pytest
import typer
from typer.testing import CliRunner

from linalign.cli import app
from linalign.config import AlignConfig, DecodeConfig
from linalign.errors import LinalignError
from linalign.options import knob_options
from linalign.params import ALIGN, DECODE, Knob, check, check_all, parse_options, variant_keys
from linalign.serve.app import APIError, _align, _decode
from linalign.serve.schemas import ChatCompletionRequest, LinalignOptions, options_schema

TOY = Knob("toy_strength", float, 0.5, "A toy knob of Linear Alignment.", ("la",), ge=0, le=1, limits={"le": 1})
MESSAGES = [{"role": "user", "content": "Hi"}]


def test_a_new_knob_declared_once_is_an_option_a_request_field_and_a_variant():
    knobs = (*ALIGN, TOY)
    command = typer.Typer()

    @command.command()
    @knob_options(knobs)
    def show(*, knobs: dict) -> None:
        print(json.dumps({"toy_strength": knobs["toy_strength"], "ratio": knobs["ratio"]}))

    out = CliRunner().invoke(command, ["--toy-strength", "0.25"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"toy_strength": 0.25, "ratio": 2.0}
    assert "--toy-strength" in CliRunner().invoke(command, ["--help"]).output

    schema = options_schema(knobs)
    assert schema(principle="p", toy_strength=0.25).knobs() == {"toy_strength": 0.25}
    with pytest.raises(pydantic.ValidationError) as err:
        schema(principle="p", toy_strength=2)
    assert err.value.errors()[0]["loc"] == ("toy_strength",)

    assert "toy_strength" in variant_keys(knobs)
    assert parse_options("toy_strength=0.25,repeat_guard=3", knobs) == {"toy_strength": 0.25, "repeat_guard": 3}
    with pytest.raises(LinalignError) as bad:
        check_all({"toy_strength": 1.5}, knobs)
    assert str(bad.value) == "toy_strength must be in [0, 1], got 1.5" and bad.value.param == "toy_strength"


def test_every_knob_is_a_field_of_its_config_an_option_and_a_request_field():
    assert [f for f in AlignConfig.__dataclass_fields__][2:] == [k.name for k in ALIGN]
    assert list(DecodeConfig.__dataclass_fields__) == [k.name for k in DECODE]
    assert {k.name for k in ALIGN} <= set(LinalignOptions.model_fields)
    assert {"temperature", "top_p", "seed", "max_tokens", "top_logprobs"} <= set(ChatCompletionRequest.model_fields)
    usage = CliRunner().invoke(app, ["generate", "--help"]).output
    assert all(k.cli_flags[0] in usage for k in (*ALIGN, *DECODE) if k.cli)
    assert "--logprobs" not in usage  # the command line's records carry none


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("ratio", -1.0, "ratio must be >= 0 (0 is plain principle prompting), got -1.0"),
        ("ratio", float("nan"), "ratio must be a finite number, got nan"),
        ("plausibility_min_p", 0, "plausibility_min_p must be in (0, 1], got 0"),
        ("dry_allowed_length", 65, "dry_allowed_length must be an integer in [1, 65), got 65"),
        ("repeat_guard", 2.0, "repeat_guard must be an integer >= 0, got 2.0"),
        ("mask", "nucleus", "unknown mask 'nucleus'; choose one of top_p, min_p, intersect"),
        ("seed", -1, "seed must be an integer in [0, 9223372036854775808), got -1"),
    ],
)
def test_a_value_is_refused_with_its_name_and_rule(knob, value, message):
    spec = next(k for k in (*ALIGN, *DECODE) if k.name == knob)
    with pytest.raises(LinalignError) as err:
        check(spec, value)
    assert (str(err.value), err.value.param) == (message, knob)


@pytest.mark.parametrize(
    ("options", "param", "words"),
    [
        ({"dry_base": 0.5}, "linalign.dry_base", "dry_base must be in [1, 10]"),
        ({"method": "dera", "kl_budget": 1.0}, "linalign.kl_budget", "kl_budget is read by method la only"),
        ({"weights": [1.0, 2.0]}, "linalign.weights", "got 2 weights for 1 principles"),
        ({"mask": "min_p", "plausibility_top_p": 1.0}, "linalign.mask", "contradicts plausibility_top_p=1.0"),
    ],
)
def test_the_server_names_the_field_of_an_alignment_error(options, param, words):
    body = ChatCompletionRequest(messages=MESSAGES, linalign={"principle": "p", **options})
    with pytest.raises(APIError) as err:
        _align(body, MESSAGES, False, 2.0)
    assert err.value.param == param and words in err.value.message


def test_the_server_names_the_field_of_a_decoding_error():
    with pytest.raises(APIError) as err:
        _decode(ChatCompletionRequest(messages=MESSAGES, temperature=1, top_p=0), 4)
    assert err.value.param == "top_p" and err.value.message.startswith("top_p must be in (0, 1]")


def test_the_server_ratio_is_a_default_of_linear_alignment_only():
    def align(**options):
        return _align(ChatCompletionRequest(messages=MESSAGES, linalign=options), MESSAGES, False, 5.0)[0]

    assert align(principle="p").ratio == 5.0 and align(principle="p", ratio=1).ratio == 1
    assert align(method="dera", principle="p", lam=0.5).label == "dera lam=0.5"


def test_the_cli_refuses_a_knob_no_method_reads_before_loading_anything():
    args = ["generate", "hi", "-p", "x", "--model", "/no/such/model", "--method", "prompt,dera", "--kl-budget", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "kl_budget is read by method la only, not by prompt, dera" in result.output
    mixed = CliRunner().invoke(app, [*args[:7], "prompt,la", "--kl-budget", "0"])
    assert mixed.exit_code == 2 and "kl_budget must be > 0" in mixed.output
