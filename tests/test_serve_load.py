"""The server under load and cost: per-request settings in one batch, continuous batching, admission limits,
operations (health, metrics, auth before parsing) and logprobs; a real server and the official client."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import httpx
import openai
import pytest
from openai import OpenAI

from linalign import AlignConfig, Aligner, DecodeConfig, step
from linalign.compute import compute_thread, on_compute_thread
from linalign.errors import LinalignError
from linalign.params import DRY_BREAKERS
from linalign.serve import create_app
from linalign.serve.batcher import Batcher, Job
from linalign.serve.server import serving

PRINCIPLE = "Answer in lowercase letters only."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "load-key"


@pytest.fixture(scope="module")
def aligner(tiny) -> Aligner:
    return Aligner(tiny)


@contextmanager
def compute_held() -> Iterator[threading.Event]:
    """Hold linalign's compute thread (every prefill and decode step waits) until the yielded event is set or
    the block ends: tests wait for events, not for time, whatever the machine's load."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait()

    holder = threading.Thread(target=on_compute_thread(hold))
    holder.start()
    holding.wait()
    try:
        yield release
    finally:
        release.set()
        holder.join()


def wait_for(condition: Callable[[], bool]) -> None:
    while not condition():
        time.sleep(0.01)


def client_for(url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=url, api_key=key, max_retries=0)


def solo(aligner: Aligner, align: AlignConfig, config: DecodeConfig, messages=QUESTION) -> str:
    return aligner.generate([messages], align, config)[0].text


MIXED = [
    ({"linalign": {"method": "la", "principle": PRINCIPLE, "ratio": 2.0}}, {"max_tokens": 20}),
    ({"linalign": {"method": "la", "principles": [PRINCIPLE, "Be rude."], "weights": [1, -0.5], "ratio": 1}}, {}),
    ({"linalign": {"method": "prompt", "principle": "Be brief."}}, {"max_tokens": 5}),
    ({"linalign": {"method": "base"}}, {"max_tokens": 9, "stop": ["the"]}),
    ({"linalign": {"method": "amulet", "principle": PRINCIPLE, "amulet_iterations": 7}}, {"max_tokens": 14}),
    ({"linalign": {"method": "la", "principle": PRINCIPLE}}, {"max_tokens": 11, "temperature": 0.8, "seed": 5}),
    ({"linalign": {"method": "la", "principle": "Be brief."}}, {"max_tokens": 16, "temperature": 1.2, "seed": 9}),
]


def _expected(aligner: Aligner, extra: dict, kwargs: dict) -> str:
    options = dict(extra["linalign"])
    principles = [options.pop("principle")] if "principle" in options else options.pop("principles", [])
    align = AlignConfig(principles=principles, **options)
    config = DecodeConfig(
        max_new_tokens=kwargs.get("max_tokens", 12),
        temperature=kwargs.get("temperature", 0.0),
        seed=kwargs.get("seed"),
        stop=kwargs.get("stop", []),
    )
    return solo(aligner, align, config)


def test_requests_with_different_settings_share_steps_and_equal_their_solo_results(aligner):
    app = create_app(aligner)
    with serving(app) as url:
        client, replies = client_for(url), {}

        def request(i: int) -> None:
            extra, kwargs = MIXED[i]
            replies[i] = client.chat.completions.create(
                model="m", messages=QUESTION, **{"max_tokens": 12} | kwargs, extra_body=extra
            )

        batcher, submitted = app.state.batcher, []
        submit = batcher.submit
        batcher.submit = lambda job: submitted.append(job) or submit(job)
        threads = [threading.Thread(target=request, args=(i,)) for i in range(len(MIXED))]
        with compute_held():  # no prefill until every request is in: they all decode together
            for t in threads:
                t.start()
            wait_for(lambda: len(submitted) == len(MIXED))
        for t in threads:
            t.join()
        assert max(app.state.batcher.batch_sizes) >= 4  # different settings decoded in the same steps
    for i, (extra, kwargs) in enumerate(MIXED):
        assert replies[i].choices[0].message.content == _expected(aligner, extra, kwargs), MIXED[i]


def test_the_model_and_each_token_stay_on_the_compute_thread(aligner, monkeypatch):
    """One thread owns the model: the server's decode steps run on linalign's compute thread, whose tokens leave
    it once, for the event loop that streams them."""
    app = create_app(aligner)
    steps: set[threading.Thread] = set()
    sends: set[threading.Thread] = set()
    put = Job.put
    monkeypatch.setattr(Job, "put", lambda job, item: sends.add(threading.current_thread()) or put(job, item))
    with serving(app) as url:
        batcher = app.state.batcher
        step = batcher._step
        batcher._step = lambda newcomers: steps.add(threading.current_thread()) or step(newcomers)
        extra = {"linalign": {"method": "la", "principle": PRINCIPLE}}
        chunks = client_for(url).chat.completions.create(
            model="m", messages=QUESTION, max_tokens=8, stream=True, extra_body=extra
        )
        assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) >= 2
    assert steps == sends == {compute_thread()}


def test_a_short_request_finishes_while_a_long_one_streams(aligner):
    app = create_app(aligner, max_batch=4)
    with serving(app) as url:
        client = client_for(url)
        first_text, finished = threading.Event(), {}

        def long() -> None:
            stream = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=400, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first_text.set()
            finished["long"] = time.monotonic()

        thread = threading.Thread(target=long)
        thread.start()
        assert first_text.wait(30)
        short = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=4, extra_body={"linalign": {"principle": PRINCIPLE}}
        )
        finished["short"] = time.monotonic()
        thread.join()
    assert finished["short"] < finished["long"]
    expected = solo(aligner, AlignConfig(method="la", principles=[PRINCIPLE]), DecodeConfig(max_new_tokens=4))
    assert short.choices[0].message.content == expected


def test_a_full_queue_is_429_with_retry_after(aligner):
    app = create_app(aligner, max_batch=1, max_queue=1, batch_window=0)
    with serving(app) as url:
        body = {"messages": QUESTION, "max_tokens": 300}
        with httpx.Client(timeout=60) as http:
            threads = [threading.Thread(target=http.post, args=(f"{url}/chat/completions",), kwargs={"json": body})]
            threads[0].start()
            deadline = time.monotonic() + 10
            while app.state.batcher.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            threads.append(threading.Thread(target=http.post, args=(f"{url}/chat/completions",), kwargs={"json": body}))
            threads[1].start()
            while app.state.batcher.queued == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as err:
                client_for(url).chat.completions.create(model="m", messages=QUESTION, max_tokens=2)
            assert err.value.response.headers["retry-after"] == "1"
            assert "queue is full" in err.value.body["message"]
            metrics = http.get(url.removesuffix("/v1") + "/metrics").text
            assert 'linalign_rejected_requests_total{reason="queue_full"} 1.0' in metrics
            for t in threads:
                t.join()


def test_a_request_past_the_deadline_is_a_clear_504(aligner):
    app = create_app(aligner, request_timeout=0.3)
    with serving(app) as url:
        client = client_for(url)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="m", messages=QUESTION, max_tokens=450)
        assert err.value.status_code == 504 and "time limit" in err.value.body["message"]
        with pytest.raises(openai.APIError, match="time limit"):
            list(client.chat.completions.create(model="m", messages=QUESTION, max_tokens=450, stream=True))
        assert client.chat.completions.create(model="m", messages=QUESTION, max_tokens=1).choices


def test_health_reports_a_stopped_decode_loop_and_answers_head(aligner):
    app = create_app(aligner)
    with serving(app) as url:
        root = url.removesuffix("/v1")
        assert httpx.head(f"{root}/health").status_code == 200
        assert httpx.get(f"{root}/health").json()["status"] == "ok"
        app.state.batcher.close()
        assert httpx.get(f"{root}/health").status_code == 503
        assert httpx.head(f"{root}/health").status_code == 503


def test_the_key_is_checked_before_the_body_and_guards_docs_and_metrics(aligner):
    with serving(create_app(aligner, api_key=KEY)) as url:
        root = url.removesuffix("/v1")
        bad_body = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "x"})
        assert bad_body.status_code == 401
        for path in ("/docs", "/openapi.json", "/metrics"):
            assert httpx.get(root + path).status_code == 401
            assert httpx.get(root + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(f"{root}/health").status_code == 200
        assert httpx.get(f"{root}/").status_code == 200  # the playground's page


def test_metrics_count_tokens_requests_and_latency(aligner):
    app = create_app(aligner)
    with serving(app) as url:
        client = client_for(url)
        reply = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=5)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=QUESTION, extra_body={"linalign": {"ratio": 1e9}})
        text = httpx.get(url.removesuffix("/v1") + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["linalign_generated_tokens_total"] == reply.usage.completion_tokens
    assert values["linalign_requests_total"] == 1
    assert values["linalign_request_seconds_count"] == 1
    assert values["linalign_time_to_first_token_seconds_count"] == 1
    assert values["linalign_queue_depth"] == 0


def test_logprobs_have_openais_shape_with_the_principled_and_plain_candidates(aligner):
    with serving(create_app(aligner)) as url:
        client = client_for(url)
        la = {"linalign": {"principle": PRINCIPLE}}
        reply = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=6, logprobs=True, top_logprobs=3, extra_body=la
        )
        streamed = client.chat.completions.create(
            model="m", messages=QUESTION, max_tokens=6, logprobs=True, top_logprobs=3, extra_body=la, stream=True
        )
        chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
        plain = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=3, logprobs=True)
    content = reply.choices[0].logprobs.content
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert b"".join(bytes(c.bytes) for c in content).decode() == reply.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.logprob  # the aligned argmax is the greedy choice
        assert item.top_logprobs[0].token == item.token
        extension = item.model_extra["linalign"]
        assert len(extension["principled"]) == 3 and len(extension["plain"]) == 3
        assert all(-9999.0 <= c["logprob"] <= 0 for c in extension["principled"] + extension["plain"])
    assert [c.content[0].token for c in chunks] == [c.token for c in content]
    assert all(
        item.top_logprobs == [] and "linalign" not in item.model_extra for item in plain.choices[0].logprobs.content
    )


def test_many_stop_strings_cost_nothing_extra(aligner):
    with serving(create_app(aligner)) as url:
        start = time.monotonic()
        reply = client_for(url).chat.completions.create(
            model="m", messages=QUESTION, max_tokens=8, stop=[f"stop-{i}-" + "x" * 240 for i in range(16)]
        )
        assert time.monotonic() - start < 10 and reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_usage_counts_the_tokens(aligner):
    with serving(create_app(aligner)) as url:
        body = {"messages": QUESTION, "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/chat/completions", json=body) as response:
            events = [json.loads(x.removeprefix("data: ")) for x in response.iter_lines() if x.startswith("data: {")]
    assert events[-1]["usage"]["completion_tokens"] == 7 or events[-2]["choices"][0]["finish_reason"] == "stop"


def test_logprob_bytes_are_each_tokens_raw_bytes(aligner, tokenizer):
    from linalign.serve.app import TokenTexts

    texts = TokenTexts(tokenizer)
    text = "Hi 😀 café ☃ 漢字"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in texts(t)[0] for t in ids)  # some tokens hold part of a character
    assert b"".join(bytes(texts(t)[1]) for t in ids).decode() == text
    eos = tokenizer.eos_token_id
    assert texts(eos) == (tokenizer.decode([eos]), list(tokenizer.decode([eos]).encode()))


def test_a_queued_request_is_a_503_at_once_and_a_running_one_ends_after_the_grace(aligner):
    app = create_app(aligner, max_batch=1, batch_window=0, shutdown_grace=1.0)
    with serving(app) as url:
        batcher, root, replies = app.state.batcher, url.removesuffix("/v1"), {}
        long = {"messages": QUESTION, "max_tokens": 450, "stream": True}

        def stream() -> None:
            with httpx.stream("POST", f"{url}/chat/completions", json=long, timeout=60) as response:
                replies["stream"] = [line for line in response.iter_lines() if line]

        def queued() -> None:
            replies["queued"] = httpx.post(f"{url}/chat/completions", json={"messages": QUESTION}, timeout=60)

        threads = [threading.Thread(target=stream), threading.Thread(target=queued)]
        threads[0].start()
        deadline = time.monotonic() + 30
        while batcher.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        threads[1].start()
        while batcher.queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        held = compute_held()  # the stream cannot finish on its own, however fast the machine
        held.__enter__()
        start = time.monotonic()
        app.state.begin_shutdown()
        threads[1].join(10)
        assert replies["queued"].status_code == 503 and time.monotonic() - start < 1.0
        assert replies["queued"].json()["error"]["code"] == "server_shutting_down"
        health = httpx.get(f"{root}/health")
        assert health.status_code == 503 and health.json()["status"] == "shutting_down"
        refused = httpx.post(f"{url}/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "takes no new requests" in refused.json()["error"]["message"]
        threads[0].join(30)
        ended = time.monotonic() - start
        held.__exit__(None, None, None)
    assert 1.0 <= ended < 10
    *_, error, done = replies["stream"]
    assert done == "data: [DONE]"
    assert json.loads(error.removeprefix("data: "))["error"]["code"] == "server_shutting_down"


def _job(aligner: Aligner, n: int = 1, max_tokens: int = 16, words: int = 3) -> Job:
    config = DecodeConfig(max_new_tokens=max_tokens, temperature=1.0 if n > 1 else 0.0)
    prepared = aligner.prepare([{"role": "user", "content": "word " * words}], AlignConfig(method="base"), config)
    return Job([prepared] * n, asyncio.new_event_loop())


def _admitted(batcher: Batcher, *jobs: Job) -> list[Job]:
    """Queue `jobs`, admit once, and count what was admitted as running (nothing is decoded)."""
    for job in jobs:
        batcher.submit(job)
    admitted = batcher._admit()
    batcher._running.update(admitted)
    return admitted


def _finish(batcher: Batcher, *jobs: Job) -> None:
    for job in jobs:
        batcher._running.discard(job)


def test_places_are_kept_for_short_requests_and_n_is_bounded_by_a_share(aligner):
    batcher = Batcher(aligner, max_batch=8)  # 2 places kept for short requests; 6 for the rest
    assert (batcher.reserve, batcher.share) == (2, 6)
    heavy = _job(aligner, n=6, max_tokens=400)
    assert _admitted(batcher, heavy) == [heavy] and not heavy.short
    long, short = _job(aligner, max_tokens=300), _job(aligner, max_tokens=16)
    assert _admitted(batcher, long, short) == [short]  # the long one waits: 6 long places are taken
    other = _job(aligner, max_tokens=16)
    assert _admitted(batcher, other) == [other]  # a second short one takes the last kept place
    assert _admitted(batcher, _job(aligner)) == []  # the batch is full
    with pytest.raises(LinalignError, match="n must be at most 6"):
        batcher.submit(_job(aligner, n=7))


def test_the_oldest_long_request_holds_the_places_it_waits_for(aligner):
    batcher = Batcher(aligner, max_batch=8)
    shorts = [_job(aligner) for _ in range(5)]
    assert _admitted(batcher, *shorts) == shorts
    long, later_long, short = _job(aligner, n=4, max_tokens=300), _job(aligner, max_tokens=300), _job(aligner)
    # 5 + 4 > 8: the long request waits and holds 4 places; the later long one may not pass it, nor may a short
    # one take the places it holds (the kept ones are taken: 5 short sequences run).
    assert _admitted(batcher, long, later_long, short) == []
    _finish(batcher, *shorts[:2])
    assert _admitted(batcher) == [long, later_long]  # in their order; 3 short + 5 long sequences fill the batch
    _finish(batcher, shorts[2])
    assert _admitted(batcher) == [short]


def test_newcomers_are_admitted_at_once_and_prefilled_in_groups_of_at_most_a_chunk(aligner):
    """Admission computes nothing (the decode loop prefills a chunk per step), so long prompts are not held back;
    short ones are grouped, a chunk's worth at most, so that a prefix they share is computed once."""
    batcher = Batcher(aligner, max_batch=16, prefill_chunk=100)
    big1, big2, smalls = _job(aligner, words=80), _job(aligner, words=80), [_job(aligner) for _ in range(3)]
    assert big1.prefill_tokens > 100 and 2 * smalls[0].prefill_tokens <= 100 < 3 * smalls[0].prefill_tokens
    admitted = _admitted(batcher, big1, *smalls, big2)
    assert admitted == [big1, *smalls, big2]
    assert batcher._groups(admitted) == [smalls[:2], smalls[2:], [big1], [big2]]


def test_a_fixed_kv_cache_is_shared_by_reservation(aligner):
    batcher = Batcher(aligner, max_batch=16)
    batcher._capacity = {0: 600}  # as a llama.cpp cache of 600 cells would be: 450 for requests not short
    prompt = _job(aligner).prepared[0].prompt_tokens
    heavy = _job(aligner, n=2, max_tokens=400)
    assert _admitted(batcher, heavy) == [heavy]
    assert heavy.max_new_tokens == 225 - prompt  # lowered to fit its share: 2 x (prompt + new) <= 450
    long, short = _job(aligner, max_tokens=300), _job(aligner, max_tokens=100)
    assert _admitted(batcher, long, short) == [short]  # the long one would pass 450 cells; the short fits beside
    _finish(batcher, heavy)
    assert _admitted(batcher) == [long]


def test_the_loop_penalty_reads_the_vocabulary_when_the_server_starts_not_in_the_first_request(tiny):
    fresh = replace(tiny, tokenizer=copy.deepcopy(tiny.tokenizer))  # a tokenizer no test has read yet
    assert (id(fresh.tokenizer), DRY_BREAKERS) not in step._BREAKER_SETS
    Batcher(Aligner(fresh))
    assert step._BREAKER_SETS[id(fresh.tokenizer), DRY_BREAKERS][0] is fresh.tokenizer
