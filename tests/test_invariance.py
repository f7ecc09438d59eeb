"""Batch invariance: a request's tokens depend on the request alone — not on its companions in a call, on what
joins or leaves the batch while it decodes, or on the server's load — on both backends on CPU. Every comparison
here runs one kernel on one machine, so it is exact (bit for bit where logits are compared)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.prompts import build_ids

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow  # the real built-in model

from linalign.backends.llamacpp import LlamaCppModel  # noqa: E402
from linalign.models import builtin_gguf  # noqa: E402

PRINCIPLE = "You are a pirate. Talk like a pirate."
QUESTIONS = [
    "What should I pack for a weekend camping trip?",
    "Name a fruit.",
    "Why is the sky blue? Explain it in detail, please, with an example.",
    "Tell me a story about a dragon.",
]
GREEDY = DecodeConfig(max_new_tokens=24)
SAMPLED = DecodeConfig(max_new_tokens=24, temperature=0.7, seed=1)


@pytest.fixture(scope="module")
def llama() -> Aligner:
    return Aligner(backend="llamacpp")


@pytest.fixture(scope="module")
def model() -> LlamaCppModel:
    return LlamaCppModel(builtin_gguf())  # the defaults under test


@pytest.fixture(scope="module")
def transformers(smollm2) -> Aligner:
    return Aligner(smollm2)  # the built-in model's weights on the transformers backend, batch-invariant on CPU


@pytest.mark.parametrize("backend", ["llama", "transformers"])
@pytest.mark.parametrize("config", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_the_first_prompt_decodes_alike_alone_and_with_companions(request, backend, config):
    aligner = request.getfixturevalue(backend)
    align = AlignConfig(method="la", principles=[PRINCIPLE])
    alone = aligner.generate(QUESTIONS[:1], align, config)[0]
    for companions in (1, 3):
        together = aligner.generate(QUESTIONS[: 1 + companions], align, config)[0]
        assert together.token_ids == alone.token_ids, (companions, alone.text, together.text)


def test_transformers_rows_that_join_and_leave_leave_a_row_bit_for_bit_alone(smollm2, tokenizer):
    """Prefilled beside another row, then rows join and leave (left padding comes and goes): the first row's
    logits at every step are those of the row decoded alone (stock batching moves them by ~4e-5)."""
    ids = [build_ids(tokenizer, q, PRINCIPLE) for q in QUESTIONS]
    tokens = [int(t) for t in torch.randint(100, 40000, (20,), generator=torch.Generator().manual_seed(0))]
    solo = smollm2.open()
    expected = [solo.add([ids[0]])[0]] + [solo.step(torch.tensor([t]))[0] for t in tokens]
    busy = smollm2.open()
    got = [busy.add([ids[0], ids[2]])[0]]
    for step, token in enumerate(tokens):
        if step % 6 == 2:  # two rows join, one longer than the first
            busy.add([ids[1], ids[2]])
        if step % 6 == 4:  # every row but the first leaves
            busy.keep(torch.tensor([0]))
        got.append(busy.step(torch.tensor([token] * busy.rows))[0])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("backend", ["llamacpp", "transformers"])
def test_the_command_line_answers_alike_alone_and_with_companions(backend):
    cli = Path(sys.executable).with_name("linalign")
    answers = []
    for questions in (QUESTIONS[:1], QUESTIONS[:2], QUESTIONS):
        command = [cli, "generate", *questions, "-p", PRINCIPLE, "--method", "la", "--max-new-tokens", "24"]
        command += ["--backend", backend, "--json"]
        lines = subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()
        answers.append(json.loads(lines[0])["text"])
    assert answers[1] == answers[0] and answers[2] == answers[0]


def test_a_one_row_step_over_a_large_cache_equals_the_same_row_beside_another(model):
    """A lone token over 512+ cells would take llama.cpp's split attention sum: the ghost row prevents it."""
    long, short = list(range(1000, 1300)), list(range(2000, 2040))
    alone = model.open(1024)
    alone.add([long])
    paired = model.open(1024)
    paired.add([long, short])
    for token in (5, 6, 7):
        assert torch.equal(alone.step(torch.tensor([token]))[0], paired.step(torch.tensor([token, 9]))[0])


def test_rows_that_join_and_leave_and_compaction_leave_a_row_bit_for_bit_alone(model, tokenizer):
    """Rows join while another decodes, others leave, and the cache runs out of room twice (compaction):
    the first row's logits at every step are those of the row decoded alone."""
    ids = [build_ids(tokenizer, q, PRINCIPLE) for q in QUESTIONS]
    tokens = [int(t) for t in torch.randint(100, 40000, (40,), generator=torch.Generator().manual_seed(0))]
    solo = model.open(256)
    expected = [solo.add([ids[0]])[0]] + [solo.step(torch.tensor([t]))[0] for t in tokens]
    busy = model.open(256)  # room for the first row and a few others, not for all that pass through
    got = [busy.add([ids[0]])[0]]
    for step, token in enumerate(tokens):
        if step % 8 == 2:  # two rows join
            busy.add([ids[1 + step % 3], ids[(2 + step) % 4]])
        if step % 8 == 6:  # every row but the first leaves
            busy.keep(torch.tensor([0]))
        got.append(busy.step(torch.tensor([token] * busy.rows))[0])
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_the_server_answers_alike_alone_and_among_sixteen_mixed_requests(llama):
    from openai import OpenAI

    from linalign.serve import create_app
    from linalign.serve.server import serving

    def ask(client, question: str, max_tokens: int, extra: dict, **sampling) -> str:
        messages = [{"role": "user", "content": question}]
        reply = client.chat.completions.create(
            model="m", messages=messages, max_tokens=max_tokens, extra_body={"linalign": extra}, **sampling
        )
        return reply.choices[0].message.content

    la = {"method": "la", "principle": PRINCIPLE}
    probes = [(QUESTIONS[0], 24, la, {}), (QUESTIONS[0], 24, la, {"temperature": 0.7, "seed": 1})]
    mix = [
        (
            QUESTIONS[i % 4],
            8 + 9 * i,
            {"method": ("la", "prompt", "base", "amulet")[i % 4], "principle": f"Principle {i % 3}: be brief."},
            {"temperature": 0.8, "seed": i} if i % 2 else {},
        )
        for i in range(14)
    ]
    with serving(create_app(llama)) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        alone = [ask(client, *probe[:3], **probe[3]) for probe in probes]
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(ask, client, *r[:3], **r[3]) for r in mix[:7]]
            futures += [pool.submit(ask, client, *probe[:3], **probe[3]) for probe in probes]
            futures += [pool.submit(ask, client, *r[:3], **r[3]) for r in mix[7:]]
            busy = [f.result() for f in futures[7:9]]
    assert busy == alone


def test_a_batch_job_resumed_into_other_batches_writes_what_one_run_writes(llama, tmp_path):
    """A rerun plans the records left into new batches, beside other companions: on the default backend their
    text is that of the uninterrupted run, byte for byte (so a resumed job, or one on Ray, equals one run)."""
    from linalign.jobs import JobSettings, run_batch, run_job

    source = tmp_path / "in.jsonl"
    rows = [{"id": i, "prompt": QUESTIONS[i % 4], "principle": f"Principle {i % 3}: be brief."} for i in range(5)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = JobSettings(input=str(source), backend="llamacpp", methods=["la"], decode={"max_new_tokens": 24})

    def executor(stop_after: int | None = None):
        return lambda batches: (run_batch(llama, settings, b) for b in batches[:stop_after])

    def job(out: Path, batch_size: int, stop_after: int | None = None) -> None:
        run_job(settings, out, executor(stop_after), batch_size=batch_size, report=print, show_progress=False)

    job(tmp_path / "one.jsonl", batch_size=3)  # batches 0-2 and 3-4
    resumed = tmp_path / "resumed.jsonl"
    job(resumed, batch_size=2, stop_after=1)  # interrupted after 0-1
    job(resumed, batch_size=3)  # then 2-4
    assert len(resumed.read_text().splitlines()) == 5
    assert sorted(resumed.read_text().splitlines()) == sorted((tmp_path / "one.jsonl").read_text().splitlines())
