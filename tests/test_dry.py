"""The soft loop penalty (DRY) of `linalign.step.LoopPenalty`: its values against the textbook formula on
hand-made replies, the known failures of DRY (structured frames, tool calls, multi-line loops), its place in
the step (combined logits and the mask's distribution, once, per sequence) and its options everywhere.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from reference import Paper

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.config import DRY_BREAKERS
from linalign.errors import LinalignError
from linalign.methods import make_plan
from linalign.prompts import build_ids
from linalign.step import LoopPenalty, breaker_tokens, penalise_loops
from linalign.text import vocabulary_texts

M, BASE, ALLOWED = 0.8, 1.75, 2
HARD, LINE, BARE = 99, 98, 97  # a breaker, a newline and a punctuation token of the hand-made replies


def penalty(tokens, multiplier=M, base=BASE, allowed=ALLOWED, hard=frozenset({HARD}), line=frozenset({LINE})):
    p = LoopPenalty(multiplier, base, allowed, frozenset(hard), frozenset(line), bare=frozenset({BARE}))
    for t in tokens:
        p.push(t)
    return p.penalties()


def textbook(tokens, multiplier=M, base=BASE, allowed=ALLOWED, breakers=frozenset({HARD})):
    """DRY as text-generation-webui #5677 defines it: for every earlier occurrence of the last token, the
    longest run of tokens before it that equals the run before the end of the reply, stopping at a breaker;
    the token that followed that occurrence loses `multiplier * base ** (length - allowed)` when the length is
    at least `allowed`. Breakers are never penalised, and nothing is when the last token is a breaker."""
    out: dict[int, float] = {}
    if len(tokens) < 2 or tokens[-1] in breakers:
        return out
    for i in range(len(tokens) - 1):
        follower = tokens[i + 1]
        if follower in breakers:
            continue
        length = 0
        while i - length >= 0 and tokens[i - length] == tokens[-1 - length] and tokens[-1 - length] not in breakers:
            length += 1
        if length >= allowed:
            out[follower] = max(out.get(follower, 0.0), multiplier * base ** (length - allowed))
    return out


# -- values against the formula ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([1, 2, 3, 1, 2], {3: M}),  # "1 2" repeats (length 2 = allowed): 3 would make it 3 long
        ([1, 2, 3, 4, 1, 2, 3], {4: M * BASE}),  # length 3
        ([1, 2, 3, 4, 5, 1, 2, 3, 4], {5: M * BASE**2}),  # length 4
        ([1, 2, 3, 1], {}),  # length 1 < allowed
        ([7, 1, 2, 3, 8, 1, 2, 4, 1, 2], {3: M, 4: M}),  # two earlier spans, one penalty each
        ([7, 1, 2, 3, 8, 7, 1, 2, 4, 7, 1, 2], {3: M * BASE, 4: M * BASE}),  # the longest match per token
        ([1, HARD, 2, 3, 4, 1, HARD, 2, 3], {4: M}),  # the breaker ends the match at "2 3"
        ([1, 2, HARD, 1, 2], {}),  # a breaker is never penalised
        ([1, HARD, 2, 1, HARD], {}),  # nothing after a breaker
        ([5, 5, 5, 5], {5: M * BASE}),  # a run of one token: the earlier occurrences overlap the suffix
    ],
)
def test_penalty_values_on_hand_made_replies(tokens, expected):
    got = penalty(tokens)
    assert got.keys() == expected.keys()
    for token, value in expected.items():
        assert got[token] == pytest.approx(value)
    assert got == pytest.approx(textbook(tokens))


def test_penalty_equals_the_textbook_formula_on_random_replies():
    """Without newline tokens the stage is DRY exactly, at every length of every reply, for several settings."""
    rng = random.Random(0)
    for trial in range(300):
        alphabet = [1, 2, 3, HARD] if trial % 2 else [1, 2, 3, 4, 5, 6, HARD]
        tokens = [rng.choice(alphabet) for _ in range(rng.randint(1, 40))]
        multiplier, base, allowed = rng.choice([(0.8, 1.75, 2), (2.0, 1.5, 3), (0.3, 2.0, 1)])
        p = LoopPenalty(multiplier, base, allowed, frozenset({HARD}), frozenset())
        for n, t in enumerate(tokens, 1):
            p.push(t)
            assert p.penalties() == pytest.approx(textbook(tokens[:n], multiplier, base, allowed))


def test_long_matches_are_capped_and_finite():
    got = penalty([3] * 500, base=10.0)
    assert list(got) == [3] and 1e20 < got[3] <= 1e30


def test_penalties_subtract_from_every_tensor_once():
    combined, anchor = torch.zeros(2, 6), torch.ones(2, 6)
    penalise_loops((combined, anchor), [{1: 0.5, 4: 2.0}, {}])
    assert combined[0].tolist() == [0, -0.5, 0, 0, -2.0, 0] and combined[1].tolist() == [0] * 6
    assert anchor[0].tolist() == [1, 0.5, 1, 1, -1.0, 1]
    penalise_loops((combined,), [{}, {}])  # nothing to do: untouched
    assert combined[1].tolist() == [0] * 6


# -- multi-line loops: DRY's newline breaker hides them (vllm-mlx #723); a whole repeated line does not --------


def test_a_loop_of_whole_lines_is_penalised_more_with_every_line():
    line = [5, 6]  # a line two tokens long: DRY alone never reaches past its allowed length inside it
    reply = []
    seen = []
    for _ in range(4):
        reply += line + [LINE]
        seen.append(penalty(reply).get(5, 0.0))
        assert textbook(reply, breakers=frozenset({HARD, LINE})) == {}  # DRY with "\n" as a breaker: nothing
    # After copy k of the line (3 tokens with its newline) the next copy's first token costs M * BASE ** (3k - 5).
    assert seen == pytest.approx([0.0, M * BASE, M * BASE**4, M * BASE**7])


def test_blank_lines_between_repeated_lines_are_crossed():
    # "5 6 \n \n 5 6 \n \n": paragraphs of one line repeated, a blank line between them
    got = penalty([5, 6, LINE, LINE, 5, 6, LINE, LINE])
    assert got == pytest.approx({5: M * BASE**2})  # the blank line, "5 6" and its newline: length 4


def test_a_frame_at_the_start_of_differing_lines_stops_at_the_newline():
    dash = 20  # "- " opening every item of a list whose items differ
    reply = [dash, 11, 12, LINE, dash, 13, 14, LINE, dash, 15, 16, LINE, dash]
    assert penalty(reply) == {}  # "\n- " is one token past the newline: length 1, as in DRY
    lines_with_breakers = [5, HARD, 6, LINE, 5, HARD, 6, LINE]  # 'key: value' lines repeated whole
    assert penalty(lines_with_breakers) == {}
    punctuation = [5, 6, LINE, BARE, LINE, 7, 8, LINE, BARE, LINE]  # "}," closing two different blocks
    assert penalty(punctuation) == {}


def test_the_current_line_and_the_lines_before_it_count_together():
    # "5 6 \n 5 6 \n 5": the partial line "5", its newline and the whole line "5 6" before it repeat (length 4)
    got = penalty([5, 6, LINE, 5, 6, LINE, 5])
    assert got == pytest.approx({6: M * BASE**2})


# -- breakers on the token level, with the real tokenizer --------------------------------------------------------


def test_breakers_are_tokens_whose_text_contains_one(tokenizer):
    hard, line, bare = breaker_tokens(tokenizer, DRY_BREAKERS)
    assert tokenizer.encode(" },", add_special_tokens=False)[0] in bare and all(
        t not in bare for t in tokenizer.encode(" camera", add_special_tokens=False)
    )
    for text in ['"', ":", "*", '":', ' "', "**"]:
        for token in tokenizer.encode(text, add_special_tokens=False):
            assert token in hard, text
    newline = tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in line and newline[0] not in hard
    assert all(t not in hard and t not in line for t in tokenizer.encode(" camera lens", add_special_tokens=False))
    assert breaker_tokens(tokenizer, DRY_BREAKERS)[0] is hard  # decoded once per tokenizer and breakers
    assert breaker_tokens(tokenizer, [":"])[1] == frozenset()  # without "\n" no token ends a line


def test_the_vocabulary_is_read_by_the_tokenizers_own_batch_decode_with_the_same_texts(tokenizer):
    texts = vocabulary_texts(tokenizer)
    assert texts == tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    assert len(texts) == len(tokenizer) and texts[tokenizer.encode("\n", add_special_tokens=False)[0]] == "\n"


def _walk(tokenizer, text: str, multiplier: float = M) -> list[tuple[str, float]]:
    """Each token of `text` with what the penalty takes from it when a model emits `text` as its reply."""
    p = LoopPenalty(multiplier, BASE, ALLOWED, *breaker_tokens(tokenizer, DRY_BREAKERS))
    out = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        out.append((tokenizer.decode([token]), p.penalties().get(token, 0.0)))
        p.push(token)
    return out


def test_a_json_list_of_objects_keeps_its_frame_at_the_defaults(tokenizer):
    """Keys, quotes and punctuation repeat in every object: they lose nothing; the values are free text."""
    items = [
        {"name": name, "colour": colour, "price": price}
        for name, colour, price in [("apple", "red", 1), ("banana", "yellow", 2), ("grape", "green", 3)]
        + [("lemon", "yellow", 4), ("plum", "purple", 5), ("kiwi", "brown", 6)]
    ]
    for text in (json.dumps(items), json.dumps(items, indent=2)):
        walked = _walk(tokenizer, text)
        assert max(v for _, v in walked) == 0.0, [w for w in walked if w[1]]


def test_tool_calls_repeating_one_frame_pay_a_bounded_price(tokenizer):
    """llama.cpp #22007: DRY broke tool-call edits. A list of calls to one tool with the same argument names:
    the frame (keys, quotes, braces) loses nothing, and a value repeated in every call ("get_current_weather",
    five tokens) loses at most `multiplier * base ** (5 - 1 - allowed)` = 2.45 logits on its last token,
    the same in the sixth call as in the second: the quotes around it end every match."""
    calls = [
        {"name": "get_current_weather", "arguments": {"city": city, "unit": "celsius"}}
        for city in ("Paris", "London", "Berlin", "Madrid", "Rome", "Vienna")
    ]
    walked = _walk(tokenizer, json.dumps(calls))
    assert max(v for _, v in walked) == pytest.approx(M * BASE**2)
    frame = [v for token, v in walked if any(c in token for c in '"{}:,[]')]
    assert max(frame) == 0.0
    per_call = [v for token, v in walked if token == "weather"]
    assert per_call[0] == 0.0 and per_call[1:] == pytest.approx([M * BASE**2] * 5)


def test_copying_from_the_prompt_is_free(tokenizer):
    """The edit of llama.cpp #22007 copies a span of the prompt ("oldString"): only the reply counts, so a reply
    that copies the prompt's code loses nothing, whatever the multiplier."""
    code = "def area(width, height):\n    return width * height\n"
    assert max(v for _, v in _walk(tokenizer, code, multiplier=5.0)) == 0.0  # once in the reply: free


def test_a_multi_line_loop_in_real_text_is_penalised(tokenizer):
    """Short lines repeated: DRY with its newline breaker takes at most one multiplier from any token, however
    long the loop; here the fifth copy costs more than any logit margin."""
    walked = _walk(tokenizer, "I see.\n" * 5)
    hard, line, _ = breaker_tokens(tokenizer, DRY_BREAKERS)
    tokens = tokenizer.encode("I see.\n" * 5, add_special_tokens=False)
    dry = [textbook(tokens[:n], breakers=hard | line).get(tokens[n], 0.0) for n in range(1, len(tokens))]
    assert max(dry) <= M
    assert max(v for _, v in walked) > 20


# -- options and their validation ----------------------------------------------------------------------------------


def test_options_reach_the_plan_and_the_label():
    config = AlignConfig(principles=["p"], dry_multiplier=0.8)
    plan = make_plan(config)
    assert (plan.dry_multiplier, plan.dry_base, plan.dry_allowed_length) == (0.8, 1.75, 2)
    assert plan.dry_breakers == DRY_BREAKERS
    assert config.label == "la ratio=2 dry=0.8"
    assert AlignConfig(principles=["p"], dry_multiplier=1, dry_base=2, dry_allowed_length=4).label.endswith(
        "dry=1/b2/a4"
    )
    assert Paper(principles=["p"]).label == "la ratio=2"  # off in the paper's recipe
    assert make_plan(AlignConfig(method="prompt", principles=["p"], dry_multiplier=0.5)).dry_multiplier == 0.5


def test_the_default_preset_gives_linear_alignment_the_penalty():
    """Unset, the loop multiplier is the preset's for Linear Alignment (2 by default, 0 in the paper's recipe) and
    0 for the other methods, which the rule of docs/quality.md did not judge; a value given wins over any preset.
    Resolved when read, so `dataclasses.replace` with another preset or method resolves again."""
    assert AlignConfig(principles=["p"]).loop_multiplier == 2
    assert AlignConfig(principles=["p"]).label == "la ratio=2 dry=2"
    assert AlignConfig(principles=["p"], preset="paper").loop_multiplier == 0.0
    assert [AlignConfig(method=m, principles=["p"]).loop_multiplier for m in ("base", "prompt", "amulet")] == [0.0] * 3
    assert AlignConfig(principles=["p"], preset="paper", dry_multiplier=0.8).loop_multiplier == 0.8
    assert AlignConfig(principles=["p"], dry_multiplier=0).label == "la ratio=2"
    assert replace(AlignConfig(principles=["p"]), preset="paper").label == "la ratio=2"
    assert make_plan(replace(AlignConfig(principles=["p"]), method="prompt")).dry_multiplier == 0.0
    assert make_plan(AlignConfig(principles=["p"])).dry_multiplier == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dry_multiplier": -0.1}, "dry_multiplier must be in"),
        ({"dry_multiplier": float("nan")}, "dry_multiplier must be a finite number"),
        ({"dry_base": 0.5}, "dry_base must be in"),
        ({"dry_allowed_length": 0}, "dry_allowed_length must be an integer"),
        ({"dry_breakers": [""]}, "dry_breakers must be"),
        ({"preset": "fast"}, "unknown preset 'fast'; choose one of default, paper"),
    ],
)
def test_bad_options_are_refused_with_a_sentence(options, message):
    with pytest.raises(LinalignError, match=message):
        AlignConfig(principles=["p"], **options)


# -- in the decode step ------------------------------------------------------------------------------------------

PRINCIPLE = "Answer in lowercase letters only."
QUESTIONS = ["What is the capital of France?", "Name three animals that live in the sea, please."]
N = 24


def reference_dry(loaded, principled, plain, ratio, n, multiplier, top_p=0.8):
    """Linear Alignment with the penalty from its definition: batch 1, two full uncached passes per token; the
    penalty of the reply so far taken from the combined logits and from the principled ones before the mask."""
    loops = LoopPenalty(multiplier, BASE, ALLOWED, *breaker_tokens(loaded.tokenizer, DRY_BREAKERS))
    contexts, chosen = [list(principled), list(plain)], []
    for _ in range(n):
        with torch.no_grad():
            lp, l0 = (loaded.model(torch.tensor([c])).logits[0, -1].float() for c in contexts)
        combined = (1 + ratio) * lp - ratio * l0
        for token, value in loops.penalties().items():
            combined[token] -= value
            lp[token] -= value
        probs = torch.softmax(lp, -1)
        sorted_probs, order = probs.sort(descending=True)
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        keep[0] = True
        keep = torch.zeros_like(keep).scatter(-1, order, keep)
        token = int(combined.masked_fill(~keep, float("-inf")).argmax())
        chosen.append(token)
        loops.push(token)
        for c in contexts:
            c.append(token)
        if token == loaded.tokenizer.eos_token_id:
            break
    return chosen


CYCLE = (300, 301, 302)


@pytest.fixture()
def looping(tiny):
    """The tiny model made to loop on a 3-token cycle (+30 on the cycle's next token in every context)."""

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids[:, ids.shape[1] - output.logits.shape[1] :]
        follow = torch.full_like(ids, CYCLE[0])
        for a, b in zip(CYCLE, CYCLE[1:] + CYCLE[:1], strict=True):
            follow[ids == a] = b
        bonus = torch.full_like(follow[..., None], 30.0, dtype=output.logits.dtype)
        output.logits.scatter_add_(-1, follow[..., None], bonus)
        return output

    handle = tiny.model.register_forward_hook(hook, with_kwargs=True)
    yield tiny
    handle.remove()


def test_the_penalty_breaks_a_loop_and_equals_its_reference(looping):
    aligner, config = Aligner(looping), DecodeConfig(max_new_tokens=N)
    loop = aligner.generate(QUESTIONS, Paper(principles=[PRINCIPLE]), config)
    assert all(g.token_ids[:9] == list(CYCLE * 3) for g in loop)
    soft = aligner.generate(QUESTIONS, AlignConfig(principles=[PRINCIPLE], dry_multiplier=M), config)
    for question, g in zip(QUESTIONS, soft, strict=True):
        assert g.token_ids != loop[0].token_ids[: len(g.token_ids)]
        principled = build_ids(looping.tokenizer, question, PRINCIPLE)
        plain = build_ids(looping.tokenizer, question)
        assert g.token_ids == reference_dry(looping, principled, plain, 2.0, N, M)


def test_sequences_with_and_without_the_penalty_share_a_batch(looping):
    aligner, config = Aligner(looping), DecodeConfig(max_new_tokens=N)
    aligns = [Paper(principles=[PRINCIPLE], **o) for o in ({}, {"dry_multiplier": M}, {"dry_multiplier": 3.0})]
    alone = [aligner.generate([QUESTIONS[1]], a, config)[0].token_ids for a in aligns]
    assert alone[0] != alone[1] != alone[2]
    prepared = [aligner.prepare(QUESTIONS[1], a, config) for a in aligns]
    mixed: dict[int, list[int]] = {i: [] for i in range(len(aligns))}
    for events in aligner.decode(prepared):
        for e in events:
            if e.token is not None:
                mixed[e.key].append(e.token)
    assert [mixed[i] for i in range(len(aligns))] == alone


# -- one spec: Python, CLI, server, eval -------------------------------------------------------------------------


def test_server_request_carries_the_penalty_and_refuses_bad_values():
    from linalign.serve.app import APIError, _align
    from linalign.serve.schemas import ChatCompletionRequest

    messages = [{"role": "user", "content": "Hi"}]

    def request(**options):
        return ChatCompletionRequest(messages=messages, linalign={"principle": PRINCIPLE, **options})

    body = request(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3, dry_breakers=["\n", "|"])
    align, _ = _align(body, messages, False, 2.0)
    assert (align.dry_multiplier, align.dry_base, align.dry_allowed_length) == (0.8, 2.0, 3)
    assert align.dry_breakers == ["\n", "|"] and align.label == "la ratio=2 dry=0.8/b2/a3/breakers=\\n||"
    with pytest.raises(APIError, match="dry_base must be in"):
        _align(request(dry_multiplier=0.8, dry_base=0.5), messages, False, 2.0)
    assert _align(request(), messages, False, 2.0)[0].loop_multiplier == 2  # the default preset
    assert _align(request(preset="paper"), messages, False, 2.0)[0].label == "la ratio=2"
    with pytest.raises(ValueError, match="preset"):
        request(preset="fast")


def test_cli_and_eval_take_the_penalty(tiny, tmp_path):
    from typer.testing import CliRunner

    from linalign.cli import _variants, app
    from linalign.evaluation.runner import EvalSettings

    args = ["generate", "Why?", "-p", PRINCIPLE, "--model", tiny.name, "--max-new-tokens", "3", "--json"]
    ok = CliRunner().invoke(app, [*args, "--method", "prompt,la", "--dry-multiplier", "0.8", "--dry-breaker", r"\n"])
    assert ok.exit_code == 0, ok.output
    labels = [json.loads(line)["method"] for line in ok.output.splitlines() if line.startswith("{")]
    assert labels == ["prompt", "la"]
    bad = CliRunner().invoke(app, [*args, "--dry-multiplier", "0.8", "--dry-allowed-length", "0"])
    assert bad.exit_code == 2 and "dry_allowed_length must be" in bad.output
    paper = CliRunner().invoke(app, [*args, "--method", "la", "--preset", "paper"])
    assert paper.exit_code == 0, paper.output
    unknown = CliRunner().invoke(app, [*args, "--preset", "fast"])
    assert unknown.exit_code == 2 and "unknown preset 'fast'" in unknown.output
    variants = _variants(None, None, None, ["dry_multiplier=0.8,dry_allowed_length=4", "dry_multiplier=2,mask=min_p"])
    assert variants == [{"dry_multiplier": 0.8, "dry_allowed_length": 4}, {"dry_multiplier": 2.0, "mask": "min_p"}]
    by_default = EvalSettings("principles", "m", ["la"], variants=[{"dry_multiplier": 2}, {"mask": "min_p"}])
    assert [a.label for a in by_default.runs()] == ["la ratio=2 dry=2", "la ratio=2 mask=min_p0.1 dry=2"]
    settings = EvalSettings("principles", "m", ["prompt", "la"], ratios=[2.0], variants=variants, preset="paper")
    assert [a.label for a in settings.runs()] == [
        "prompt",
        "la ratio=2",
        "la ratio=2 dry=0.8/a4",
        "la ratio=2 mask=min_p0.1 dry=2",
    ]


# -- the rule that decides the default ------------------------------------------------------------------------------


def _records(run: str, scores: list[float], ppl: float, repeat4: float) -> list[dict]:
    return [
        {"run": run, "method": "la", "task": f"t{i}", "group": "g", "score": s, "perplexity": ppl}
        | {"new_tokens": 10, "distinct2": 1.0, "repeat4": repeat4}
        for i, s in enumerate(scores)
    ]


def test_the_rule_names_each_condition_and_its_margin():
    from linalign.evaluation.decide import conditions

    paper = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]
    records = _records("prompt", [0] * 10, 2.0, 0.02) + _records("la ratio=2", paper, 3.0, 0.05)
    records += _records("good", paper, 3.2, 0.01) + _records("loops", paper, 3.0, 0.04)
    records += _records("worse", [0] * 10, 3.0, 0.0) + _records("rough", paper, 3.4, 0.0)
    assert all(c["holds"] for c in conditions(records, "good", structured=False).values())
    assert not conditions(records, "loops", structured=False)["repetition"]["holds"]
    assert not conditions(records, "worse", structured=False)["compliance"]["holds"]
    rough = conditions(records, "rough", structured=False)["perplexity"]
    assert not rough["holds"] and rough["limit"] == pytest.approx(3.3)
    structured = conditions(records, "worse", structured=True)
    assert set(structured) == {"validity"} and not structured["validity"]["holds"]


def _directory(path, suite: str, runs: dict[str, list[float]]):
    import json

    path.mkdir()
    (path / "settings.json").write_text(json.dumps({"suite": suite}))
    records = [r | {"method": run.split()[0]} for run, scores in runs.items() for r in _records(run, scores, 3.0, 0.0)]
    (path / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_rule_takes_another_reference_and_pools_the_gain_over_the_principle_sets(tmp_path, capsys):
    """Against la's default as reference, a candidate gains where the paired interval of the compliance difference,
    pooled over the principle-set directories (the structured suite left out), lies above 0."""
    from linalign.evaluation.decide import load, main, pooled_gain, verdicts

    default, user, none = "la ratio=2 dry=2", "la ratio=2 dry=2 placement=user", [0.0] * 10
    one = [1.0] * 4 + [0.0] * 6
    directories = [
        _directory(tmp_path / "greedy", "principles", {"prompt": none, default: none, user: one}),
        _directory(tmp_path / "t07", "principles-heldout", {"prompt": none, default: none, user: [0.0] * 8 + [1, 1]}),
        _directory(tmp_path / "structured", "structured", {default: none, user: [-5.0] * 10}),
    ]
    sets = load(directories)
    assert set(verdicts(sets)) == {default, user}  # against the paper's run, absent here: no condition
    assert verdicts(sets)[user][str(directories[0])] == {}
    against_default = verdicts(sets, default)
    assert set(against_default) == {user} and against_default[user][str(directories[0])]["compliance"]["holds"]
    gain = pooled_gain(sets, user, default)
    assert gain["tasks"] == 20 and gain["mean"] == pytest.approx(0.3) and gain["low"] > 0 and gain["holds"]
    alone = pooled_gain(load(directories[1:]), user, default)  # two questions of ten up: the interval reaches 0
    assert alone["tasks"] == 10 and alone["low"] == 0 and not alone["holds"]
    assert pooled_gain(sets, default, default)["holds"] is False  # no gain over itself
    main(["--reference", default, *map(str, directories)])
    printed = capsys.readouterr().out
    assert "pooled gain: compliance +0.300" in printed and "over 20 questions, above 0" in printed
    assert "validity -5.000" in printed and "FAILS" in printed
