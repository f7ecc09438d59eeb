"""The decode loop's stages where no equivalence test reaches: forwards, text and stops, histories, rows
joining and leaving, caches that cannot drop rows, and the `transformers` logits processor."""

from __future__ import annotations

import pytest
import torch

from linalign import AlignConfig, Aligner, DecodeConfig, LinalignError, LinearAlignmentLogitsProcessor
from linalign.backends.transformers import TransformersBackend
from linalign.generation import RECORD, Generation, usage
from linalign.prompts import build_ids
from linalign.text import TextStream

PRINCIPLE = "Answer in lowercase letters only."
NEGATIVE = "Write in capital letters."
QUESTIONS = ["What is the capital of France?", "Name three animals that live in the sea, please.", "Why?"]


@pytest.fixture(scope="module")
def aligner(tiny, tiny_other) -> Aligner:
    return Aligner(tiny, reference=tiny_other)


def ids_of(aligner: Aligner, prompts, align: AlignConfig, config: DecodeConfig) -> list[list[int]]:
    return [g.token_ids for g in aligner.generate(prompts, align, config)]


def test_no_forward_pass_after_the_last_token(aligner, monkeypatch):
    calls = []
    original = TransformersBackend.step
    monkeypatch.setattr(TransformersBackend, "step", lambda self, t: calls.append(len(t)) or original(self, t))
    config = DecodeConfig(max_new_tokens=5, min_new_tokens=5)
    aligner.generate(QUESTIONS[:2], AlignConfig(method="la", principles=[PRINCIPLE]), config)
    assert calls == [4] * 4  # 5 tokens need 4 steps after the prefill, each over 2 sequences x 2 contexts


# -- text and stop strings -------------------------------------------------------------------------------


def test_incremental_text_equals_a_whole_decode(tokenizer):
    text = "Héllo wörld 👋🏽 — naïve café, 日本語 and\n\nnew lines.  Spaces  too."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer)
    pieces = []
    for token in ids:
        stream.push(token)
        pieces.append(stream.delta())
    stream.finish()
    pieces.append(stream.delta(final=True))
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == stream.text
    assert all("\ufffd" not in p for p in pieces)


def test_incremental_text_decodes_a_few_tokens_per_step(tokenizer, monkeypatch):
    """Every push decodes a short window, not the whole sequence: the cost per token stays flat."""
    ids = tokenizer("word " * 300, add_special_tokens=False)["input_ids"]
    lengths = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda i, **kw: lengths.append(len(i)) or original(i, **kw))
    stream = TextStream(tokenizer)
    for token in ids:
        stream.push(token)
    assert max(lengths) <= 4


def test_stop_strings_see_the_text_users_read(tokenizer):
    """A stop string that only exists once special tokens are skipped stops, and the text is cut before it."""
    special = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("The end", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ["Theend"])
    stream.push(ids[0])
    stream.push(special)
    for token in ids[1:]:
        stream.push(token)
    assert stream.text == "The end" and not stream.stopped
    stream = TextStream(tokenizer, [" end"])
    for token in ids:
        stream.push(token)
    assert stream.stopped and stream.text == "The"


def test_partial_stop_strings_are_held_back(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, ["three five"])
    seen = ""
    for token in ids:
        stream.push(token)
        seen += stream.delta()
        assert len(stream.text) - len(seen) <= len("three five") - 1
    stream.finish()
    assert seen + stream.delta(final=True) == "one two three four"


def test_a_stop_string_straddling_the_prompt_does_not_stop(aligner, tiny):
    """The prompt ends in 'assistant\\n'; a stop string made of that newline and the reply's first characters
    matches nothing the model generated, so decoding runs on and nothing is cut."""
    align = AlignConfig(method="prompt", principles=[PRINCIPLE])
    free = aligner.generate(QUESTIONS[:1], align, DecodeConfig(max_new_tokens=12))[0]
    assert tiny.tokenizer.decode(build_ids(tiny.tokenizer, QUESTIONS[0], PRINCIPLE)).endswith("assistant\n")
    straddle = "\n" + free.text[:2]
    assert straddle not in free.text
    stopped = aligner.generate(QUESTIONS[:1], align, DecodeConfig(max_new_tokens=12, stop=[straddle]))[0]
    assert (stopped.text, stopped.finish_reason, stopped.token_ids) == (free.text, free.finish_reason, free.token_ids)


def test_streaming_with_stop_strings_reassembles_the_cut_text(aligner):
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    free = aligner.generate(QUESTIONS, align, DecodeConfig(max_new_tokens=16))
    stop = free[1].text[10:14]  # a stop string inside the second answer
    config = DecodeConfig(max_new_tokens=16, stop=[stop])
    final = aligner.generate(QUESTIONS, align, config)
    streamed, reasons = [""] * 3, [None] * 3
    for deltas in aligner.stream(QUESTIONS, align, config):
        for d in deltas:
            assert stop not in streamed[d.index] + d.text
            streamed[d.index] += d.text
            reasons[d.index] = d.finish_reason or reasons[d.index]
    assert streamed == [g.text for g in final] and reasons == [g.finish_reason for g in final]
    assert final[1].finish_reason == "stop" and final[1].text == free[1].text[: free[1].text.find(stop)]


def test_a_streams_deltas_put_together_are_what_generate_returns(aligner):
    """One result type and one way to put it together: each sequence's deltas, added up, give its whole output,
    its token ids and per-token logprobs included."""
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    config = DecodeConfig(max_new_tokens=10, stop=["e"], logprobs=2)
    final = aligner.generate(QUESTIONS, align, config)
    whole = [Generation(i) for i in range(len(QUESTIONS))]
    for deltas in aligner.stream(QUESTIONS, align, config):
        for d in deltas:
            assert d.new_tokens <= 1 and (d.logprobs is None) == (d.token is None)
            whole[d.index].add(d)
    for w, g in zip(whole, final, strict=True):
        assert (w.text, w.token_ids, w.finish_reason) == (g.text, g.token_ids, g.finish_reason)
        assert [lp.logprob for lp in w.logprobs] == [lp.logprob for lp in g.logprobs]
        assert len(g.logprobs) == g.new_tokens > 0 and all(len(lp.aligned) == 2 for lp in g.logprobs)
    record = final[0].to_dict()
    assert list(record) == [*RECORD, "ratio"] and record["new_tokens"] == len(final[0].token_ids)
    assert usage(final) == {
        "prompt_tokens": final[0].prompt_tokens,
        "completion_tokens": sum(g.new_tokens for g in final),
        "total_tokens": final[0].prompt_tokens + sum(g.new_tokens for g in final),
    }


# -- histories of the logits processors -------------------------------------------------------------------


def test_repetition_penalty_reads_each_sequences_own_unpadded_context(aligner):
    """Where pad == EOS, a padded history would penalise EOS in short rows only: batch companions would
    change a row's output. Each row equals its solo run, and principle order does not matter."""
    assert aligner.tokenizer.pad_token_id is not None
    config = DecodeConfig(max_new_tokens=16, repetition_penalty=1.5)
    align = AlignConfig(method="la", principles=[PRINCIPLE, NEGATIVE], weights=[1.0, -0.5])
    batched = ids_of(aligner, QUESTIONS, align, config)
    solo = [ids_of(aligner, [q], align, config)[0] for q in QUESTIONS]
    assert batched == solo
    swapped = AlignConfig(method="la", principles=[NEGATIVE, PRINCIPLE], weights=[-0.5, 1.0])
    assert ids_of(aligner, QUESTIONS, swapped, config) == batched


def test_no_repeat_ngram_and_top_k_act_on_the_aligned_scores(aligner):
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=3.0)
    ids = ids_of(aligner, QUESTIONS, align, DecodeConfig(max_new_tokens=24, no_repeat_ngram_size=2))
    for row in ids:
        bigrams = list(zip(row, row[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))
    sampled = ids_of(aligner, QUESTIONS, align, DecodeConfig(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))
    assert sampled == ids_of(aligner, QUESTIONS, align, DecodeConfig(max_new_tokens=12))  # top-1 of the aligned


# -- rows joining and leaving ------------------------------------------------------------------------------


def test_dera_with_rows_leaving_early(aligner):
    align = AlignConfig(method="dera", lam=1.5)
    prepared = [
        aligner.prepare(q, align, DecodeConfig(max_new_tokens=n)) for q, n in zip(QUESTIONS, (3, 14, 8), strict=True)
    ]
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for events in aligner.decode(prepared):
        for e in events:
            got[e.key].append(e.token)
    for i, (q, n) in enumerate(zip(QUESTIONS, (3, 14, 8), strict=True)):
        assert got[i] == ids_of(aligner, [q], align, DecodeConfig(max_new_tokens=n))[0]


def test_sequences_joining_a_running_batch_decode_as_alone(aligner):
    """Sequences added between steps (their caches merged, left-padded) equal their solo runs, and so do
    the running ones; the left padding that nobody needs any more is trimmed."""
    la = AlignConfig(method="la", principles=[PRINCIPLE])
    dera = AlignConfig(method="dera", principles=[PRINCIPLE], lam=0.5)
    config = DecodeConfig(max_new_tokens=10)
    decoder = aligner.decoder()
    decoder.add("long", aligner.prepare(QUESTIONS[1], la, DecodeConfig(max_new_tokens=6)))
    got: dict[str, list[int]] = {"long": [], "short": [], "dera": []}
    for step in range(13):
        if step == 2:
            decoder.add_many([("short", aligner.prepare(QUESTIONS[2], la, config))])
        if step == 3:
            decoder.add("dera", aligner.prepare(QUESTIONS[0], dera, config))
        for e in decoder.step():
            got[e.key].append(e.token)
    assert len(decoder) == 0
    assert got["long"] == ids_of(aligner, QUESTIONS[1:2], la, DecodeConfig(max_new_tokens=6))[0]
    assert got["short"] == ids_of(aligner, QUESTIONS[2:3], la, config)[0]
    assert got["dera"] == ids_of(aligner, QUESTIONS[:1], dera, config)[0]


def test_left_padding_is_trimmed_when_the_longest_row_leaves(tiny):
    backend = TransformersBackend(tiny.model, tiny.tokenizer.pad_token_id)
    backend.add([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2]])
    backend.step(torch.tensor([9, 9]))
    assert backend.attention_mask.shape[1] == 9
    backend.keep(torch.tensor([1]))
    assert backend.attention_mask.shape[1] == 3 and backend.attention_mask.all()
    assert backend.cache.layers[0].keys.shape[2] == 3


def test_a_cache_that_cannot_drop_rows_keeps_them(aligner, monkeypatch):
    """Recurrent caches cannot drop rows: finished sequences then stay in the batch, and nothing changes."""
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    prepared = [
        aligner.prepare(q, align, DecodeConfig(max_new_tokens=n)) for q, n in zip(QUESTIONS, (3, 9, 5), strict=True)
    ]

    def tokens() -> dict[int, list[int]]:
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        for events in aligner.decode(prepared):
            for e in events:
                got[e.key].append(e.token)
        return got

    expected = tokens()
    kept = []
    monkeypatch.setattr(TransformersBackend, "can_drop", property(lambda self: False))
    monkeypatch.setattr(TransformersBackend, "can_merge", property(lambda self: self.cache is None))
    original = TransformersBackend.keep
    monkeypatch.setattr(TransformersBackend, "keep", lambda self, rows: kept.append(len(rows)) or original(self, rows))
    assert tokens() == expected
    assert kept == [0]  # rows were dropped once, when every sequence had finished
    decoder = aligner.decoder()
    decoder.add(0, prepared[0])
    decoder.step()
    assert not decoder.can_add


# -- prompts prefilled in chunks --------------------------------------------------------------------------

LONG = "Summarise: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 30)  # ~300 tokens


def test_short_newcomers_pass_long_prompts_being_prefilled_and_all_decode_as_alone(aligner):
    """With a prefill budget of 32 tokens a step (on `transformers` a prompt is prefilled whole, one or more a
    step), newcomers with short prompts get their first tokens before four long requests added earlier, whose eight
    prompts take a step each at least, and every sequence decodes as it does alone."""
    la = AlignConfig(method="la", principles=[PRINCIPLE])
    dera = AlignConfig(method="dera", principles=[PRINCIPLE], lam=0.5)
    config = DecodeConfig(max_new_tokens=6)
    decoder = aligner.decoder(prefill_chunk=32)
    decoder.add_many([(f"long{i}", aligner.prepare(LONG, la, config)) for i in range(4)])
    newcomers = {
        2: ("short", aligner.prepare(QUESTIONS[0], la, config)),
        3: ("dera", aligner.prepare(QUESTIONS[2], dera, config)),
    }
    first: dict[str, int] = {}
    got: dict[str, list[int]] = {}
    for step in range(40):
        if step in newcomers:
            decoder.add(*newcomers[step])
        for e in decoder.step():
            first.setdefault(e.key, step)
            got.setdefault(e.key, []).append(e.token)
    assert len(decoder) == 0
    assert max(first["short"], first["dera"]) < min(first[f"long{i}"] for i in range(4))
    assert got["long0"] == got["long3"] == ids_of(aligner, [LONG], la, config)[0]
    assert got["short"] == ids_of(aligner, QUESTIONS[:1], la, config)[0]
    assert got["dera"] == ids_of(aligner, QUESTIONS[2:3], dera, config)[0]


def test_sequences_cancelled_while_their_prompts_are_prefilled_are_given_up_at_the_next_step(aligner):
    decoder = aligner.decoder(prefill_chunk=32)
    base = AlignConfig(method="base")
    decoder.add_many([(i, aligner.prepare(LONG, base, DecodeConfig(max_new_tokens=4))) for i in range(3)])
    assert decoder.step() == [] and decoder.coming[0].left > 32
    for i in range(3):
        decoder.cancel(i)
    assert [(e.key, e.token, e.finish_reason) for e in decoder.step()] == [(i, None, "cancelled") for i in range(3)]
    assert len(decoder) == 0 and not decoder.coming and decoder.backends[0].rows == 0


def test_long_prompts_are_prefilled_while_short_ones_keep_coming(aligner):
    """A new short prompt every step would take the whole budget from long ones if the fewest tokens left always
    went first; the oldest prompts go first after a step without a token, so they finish within twice their steps
    (on `transformers`, a prompt a step)."""
    base, one = AlignConfig(method="base"), DecodeConfig(max_new_tokens=1)
    decoder = aligner.decoder(prefill_chunk=24)
    decoder.add_many([(f"long{i}", aligner.prepare(LONG, base, one)) for i in range(4)])
    short = aligner.prepare(QUESTIONS[2], base, one)
    assert short.prompt_tokens > 24  # each short one alone is more than a step's budget
    keys: set = set()
    for step in range(2 * 4):
        decoder.add(step, short)
        keys |= {e.key for e in decoder.step()}
    assert {f"long{i}" for i in range(4)} <= keys


# -- the transformers logits processor ----------------------------------------------------------------------


def test_logits_processor_is_reusable_and_refuses_what_it_cannot_do(aligner, tiny):
    principled = build_ids(tiny.tokenizer, QUESTIONS[0], PRINCIPLE)
    plain = build_ids(tiny.tokenizer, QUESTIONS[0])
    processor = LinearAlignmentLogitsProcessor(tiny.model, [plain], ratio=2.0)
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tiny.tokenizer.pad_token_id}
    runs = [tiny.model.generate(torch.tensor([principled]), logits_processor=[processor], **kwargs) for _ in range(2)]
    expected = ids_of(aligner, QUESTIONS[:1], AlignConfig(method="la", principles=[PRINCIPLE]), DecodeConfig(10))[0]
    for run in runs:
        assert run[0, len(principled) :].tolist() == expected[: run.shape[1] - len(principled)]
    with pytest.raises(LinalignError, match="beam search"):
        tiny.model.generate(torch.tensor([principled]), logits_processor=[processor], num_beams=2, **kwargs)
    for bad in ({"temperature": 0.0}, {"ratio": -1.0}, {"plausibility_top_p": 2.0}):
        with pytest.raises(LinalignError):
            LinearAlignmentLogitsProcessor(tiny.model, [plain], **bad)
    tiny.model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(LinalignError, match="repetition_penalty"):
            LinearAlignmentLogitsProcessor(tiny.model, [plain])
    finally:
        tiny.model.generation_config.repetition_penalty = 1.0
