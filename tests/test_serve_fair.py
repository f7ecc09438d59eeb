"""A short request beside long prompts on a real server (the built-in model on llama.cpp, the default backend):
prompts are prefilled a chunk per step, so the short request's first token comes while the long prompts are still
being prefilled, and every reply is the one its request gets alone. Steps are counted, not seconds."""

from __future__ import annotations

import threading

import pytest
from openai import OpenAI

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.serve import create_app
from linalign.serve.server import serving

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow  # the real built-in model

PRINCIPLE = "Talk like a pirate."
LONG = "Summarise this text: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 15)  # ~150 tokens
SHORT = "What is rain?"
CHUNK = 32
PATIENCE = 1800  # seconds: a limit for a hung test only, never reached on a working server however loaded


def test_a_short_request_gets_its_first_token_while_long_prompts_are_still_prefilled():
    aligner = Aligner(backend="llamacpp")
    app = create_app(aligner, prefill_chunk=CHUNK)
    batcher = app.state.batcher
    jobs, steps = [], []  # requests as submitted; per step, the prompt tokens left to prefill and who got a token
    all_in, prefilling, go = threading.Event(), threading.Event(), threading.Event()
    submit, decoder = batcher.submit, batcher._decoder
    step = decoder.step

    def submitted(job) -> None:
        submit(job)
        jobs.append(job)
        if len(jobs) == 3:
            all_in.set()

    def logged():
        events = step()
        steps.append((sum(c.left for c in decoder.coming), {e.key[0] for e in events if e.token is not None}))
        if decoder.coming:
            prefilling.set()
            go.wait()  # the worker waits here until the short request is in: the long prompts are half done
        return events

    batcher.submit, decoder.step = submitted, logged
    replies: dict[str, list[str]] = {"long": [], "short": []}

    def ask(client: OpenAI, kind: str, question: str, max_tokens: int) -> None:
        reply = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            extra_body={"linalign": {"method": "la", "principle": PRINCIPLE}},
        )
        replies[kind].append(reply.choices[0].message.content)

    with serving(app) as url:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=PATIENCE)
        threads = [threading.Thread(target=ask, args=(client, "long", LONG, 2)) for _ in range(2)]
        for t in threads:
            t.start()
        assert prefilling.wait(PATIENCE)
        threads.append(threading.Thread(target=ask, args=(client, "short", SHORT, 4)))
        threads[-1].start()
        assert all_in.wait(PATIENCE)
        go.set()
        for t in threads:
            t.join()
    short, longs = jobs[-1], jobs[:2]
    first = {job: next(i for i, (_, got) in enumerate(steps) if job in got) for job in jobs}
    assert all(first[short] < first[job] for job in longs)
    assert steps[first[short]][0] > CHUNK  # more than a chunk of the long prompts was still to prefill
    assert max(len(job.prepared[0].term_ids[0]) for job in longs) > 4 * CHUNK
    alone = {
        kind: aligner.generate([q], AlignConfig(method="la", principles=[PRINCIPLE]), DecodeConfig(n))[0].text
        for kind, q, n in (("long", LONG, 2), ("short", SHORT, 4))
    }
    assert replies == {"long": [alone["long"]] * 2, "short": [alone["short"]]}
