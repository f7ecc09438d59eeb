"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1, driven by the official client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from linalign import AlignConfig, Aligner, DecodeConfig
from linalign.serve import create_app
from linalign.serve.server import serving

PRINCIPLE = "Answer in lowercase letters only."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KEY = "test-key"


@pytest.fixture(scope="module")
def tiny_aligner(tiny, tiny_other) -> Aligner:
    return Aligner(tiny, reference=tiny_other)


@pytest.fixture(scope="module")
def server(tiny_aligner):
    """The tiny model with a DeRa reference; a wide batching window so that concurrent requests meet."""
    app = create_app(tiny_aligner, batch_window=0.1, max_body_bytes=64 * 1024, model_name="tiny")
    with serving(app) as base_url:
        yield base_url, app.state.batcher


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server[0], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def smol_aligner(smollm2) -> Aligner:
    return Aligner(smollm2)


@pytest.fixture(scope="module")
def smol_url(smol_aligner):
    """The real model, behind an API key, with the system message as the principle."""
    with serving(create_app(smol_aligner, api_key=KEY, system_as_principle=True, ratio=2.0)) as base_url:
        yield base_url


def expected(aligner: Aligner, messages, align: AlignConfig, max_tokens: int):
    return aligner.generate([messages], align, DecodeConfig(max_new_tokens=max_tokens))[0]


def ask(client: OpenAI, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def test_plain_completion_equals_engine_with_truthful_usage(client, tiny_aligner):
    reply = ask(client, max_tokens=12)
    want = expected(tiny_aligner, QUESTION, AlignConfig(method="base"), 12)
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.content == want.text
    assert reply.choices[0].finish_reason == want.finish_reason
    assert reply.usage.prompt_tokens == want.prompt_tokens
    assert reply.usage.completion_tokens == want.new_tokens
    assert reply.usage.total_tokens == want.prompt_tokens + want.new_tokens


def test_stop_strings_and_max_completion_tokens(client):
    full = ask(client, max_tokens=20).choices[0].message.content
    stop = full.split()[3]
    cut = ask(client, max_tokens=20, stop=[stop, "never-generated"]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (full[: full.find(stop)], "stop")
    short = ask(client, max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_streaming_chunks_reassemble_to_the_same_text(client):
    full = ask(client, max_tokens=16, extra_body={"linalign": {"principle": PRINCIPLE}})
    stream = ask(
        client,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"linalign": {"principle": PRINCIPLE}},
    )
    chunks = list(stream)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_stream_ends_with_done(server):
    body = {"messages": QUESTION, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server[0]}/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"


def test_n_copies_need_sampling(client):
    reply = ask(client, max_tokens=8, n=2, temperature=1.0, seed=7)
    assert [c.index for c in reply.choices] == [0, 1]
    assert {c.finish_reason for c in reply.choices} <= {"stop", "length"}
    assert 2 <= reply.usage.completion_tokens <= 16
    again = ask(client, max_tokens=8, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    assert reply.choices[0].message.content != reply.choices[1].message.content  # copy c samples with seed + c
    shifted = ask(client, max_tokens=8, n=1, temperature=1.0, seed=8)
    assert shifted.choices[0].message.content == reply.choices[1].message.content
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, max_tokens=8, n=2)
    assert err.value.body["param"] == "n" and "temperature" in err.value.body["message"]


def test_dera_with_the_reference_model(client, tiny_aligner):
    options = {"method": "dera", "principle": PRINCIPLE, "lam": 0.5}
    reply = ask(client, max_tokens=10, extra_body={"linalign": options})
    align = AlignConfig(method="dera", principles=[PRINCIPLE], lam=0.5)
    assert reply.choices[0].message.content == expected(tiny_aligner, QUESTION, align, 10).text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "linalign")
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert httpx.get(server[0].removesuffix("/v1") + "/health").json()["status"] == "ok"


BAD_REQUESTS = {
    "empty messages": ({"messages": []}, "messages", "at least 1"),
    "no user message": ({"messages": [{"role": "system", "content": "hi"}]}, "messages", "user message"),
    "unknown method": ({"linalign": {"method": "magic", "principle": "p"}}, "linalign.method", "'la'"),
    "negative ratio": ({"linalign": {"principle": "p", "ratio": -1}}, "linalign.ratio", "greater than or equal to 0"),
    "misspelt option": ({"linalign": {"principle": "p", "ration": 2}}, "linalign.ration", "Extra inputs"),
    "no principle": ({"linalign": {"method": "la"}}, "linalign", "needs a principle"),
    "bad mask": (
        {"linalign": {"principle": "p", "plausibility_top_p": 2}},
        "linalign.plausibility_top_p",
        "plausibility_top_p must be in [0, 1]",
    ),
    "bad placement": (
        {"linalign": {"principle": "p", "principle_placement": "top"}},
        "linalign.principle_placement",
        "'system', 'user' or 'both'",
    ),
    "too many tokens": ({"max_tokens": 100_000}, "max_tokens", "exceeds the context"),
    "prompt too long": ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages", "context of 512"),
    "bad top_p": ({"temperature": 1, "top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    "empty stop": ({"stop": [""]}, "stop", "at least 1 character"),
    "too many stops": ({"stop": [f"s{i}" for i in range(17)]}, "stop", "at most 16 items"),
    "long stop": ({"stop": "x" * 257}, "stop", "at most 256 characters"),
    "too many principles": ({"linalign": {"principles": [f"p{i}" for i in range(17)]}}, "linalign.principles", "16"),
    "amulet iterations": (
        {"linalign": {"method": "amulet", "principle": "p", "amulet_iterations": 10**9}},
        "linalign.amulet_iterations",
        "less than or equal to 1000",
    ),
    "huge ratio": ({"linalign": {"principle": "p", "ratio": 1e300}}, "linalign.ratio", "less than or equal to 100"),
    "huge weight": ({"linalign": {"principle": "p", "weights": [-1e300]}}, "linalign.weights", "greater than or equal"),
    "huge seed": ({"temperature": 1, "seed": 2**63}, "seed", "less than 9223372036854775808"),
    "negative seed": ({"temperature": 1, "seed": -1}, "seed", "greater than or equal to 0"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools: tools is not supported"),
    "tool choice": ({"tool_choice": "auto"}, "tool_choice", "tool_choice is not supported"),
    "response format": (
        {"response_format": {"type": "json_object"}},
        "response_format",
        "response_format: response_format is not supported",
    ),
    "top_logprobs alone": ({"top_logprobs": 3}, "top_logprobs", "top_logprobs: top_logprobs needs logprobs: true"),
    "too many top_logprobs": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    "logprobs of many long copies": (
        {"n": 8, "temperature": 1, "logprobs": True, "top_logprobs": 20, "max_tokens": 450},
        "top_logprobs",
        "n x max_tokens x top_logprobs = 8 x 450 x 20 = 72000 exceeds",
    ),
    "n over a request's share": ({"n": 13, "temperature": 1}, "n", "n must be at most 12"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_are_400_and_the_server_carries_on(client, name):
    extra, param, words = BAD_REQUESTS[name]
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 4} | extra
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{k: body.pop(k) for k in ("model", "messages")}, extra_body=body)
    assert err.value.status_code == 400
    assert err.value.body["type"] == "invalid_request_error"
    assert (err.value.body["param"] or "").startswith(param or "") and (
        param is not None or not err.value.body["param"]
    )
    assert words in err.value.body["message"]
    assert ask(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


RAW_BAD = {
    "invalid json": (b'{"messages": [', "not valid JSON"),
    "missing messages": (b'{"model": "tiny"}', "messages: Field required"),
    "non-finite ratio": (
        b'{"messages": [{"role": "user", "content": "hi"}], "linalign": {"principle": "p", "ratio": NaN}}',
        "linalign.ratio: must be a finite number",
    ),
    "non-finite temperature": (
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        "temperature: must be a finite number",
    ),
    "infinite top_p": (
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1, "top_p": Infinity}',
        "top_p: must be a finite number",
    ),
    "oversized body": (
        json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]}).encode(),
        "limit of 65536 bytes",
    ),
}


@pytest.mark.parametrize("name", [*RAW_BAD, "oversized body without a length"])
def test_raw_bad_bodies_are_400(client, server, name):
    if name in RAW_BAD:
        content, words = RAW_BAD[name]
    else:  # sent in chunks, so only counting the bytes read can stop it
        body, words = RAW_BAD["oversized body"]
        content = iter([body[:1000], body[1000:]])
    response = httpx.post(
        f"{server[0]}/chat/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and words in error["message"]
    assert ask(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


HI = '[{"role": "user", "content": "hi"}]'
SURROGATES = [  # JSON's escapes can spell a lone surrogate, which no UTF-8 encoder (nor tokenizer) takes
    ("messages.0.content", '{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
    ("messages.0.content", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'),
    ("messages.0.role", '{"messages": [{"role": "\\ud800", "content": "hi"}]}'),
    ("linalign.principle", f'{{"messages": {HI}, "linalign": {{"principle": "x\\udc00"}}}}'),
    ("linalign.principles.1", f'{{"messages": {HI}, "linalign": {{"principles": ["a", "\\ud83d"]}}}}'),
    ("stop", f'{{"messages": {HI}, "stop": ["\\ud800"]}}'),
    ("model", f'{{"model": "\\ud800", "messages": {HI}}}'),
    ("linalign", f'{{"messages": {HI}, "linalign": {{"\\ud800": 1}}}}'),  # a key
]


@pytest.mark.parametrize(("param", "body"), SURROGATES)
def test_a_lone_surrogate_is_a_400_naming_the_field(client, server, param, body):
    response = httpx.post(f"{server[0]}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)
    assert ask(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_text_parts_and_the_developer_role_read_as_plain_messages(client):
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}],
        },
    ]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital\nof France?"}]
    replies = [ask(client, messages, max_tokens=8) for messages in (parts, plain)]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[0].usage.model_dump() == replies[1].usage.model_dump()


def test_a_failing_model_is_an_openai_500_and_the_worker_carries_on(client, tiny_aligner, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    from linalign.backends.transformers import TransformersBackend

    monkeypatch.setattr(TransformersBackend, "add", fail)
    monkeypatch.setattr(TransformersBackend, "prefill", fail)  # the server prefills in parts
    with pytest.raises(openai.InternalServerError) as err:
        ask(client, max_tokens=2)
    assert err.value.body["type"] == "server_error" and "RuntimeError: out of memory" in err.value.body["message"]
    with pytest.raises(openai.APIError, match="out of memory"):  # the stream has begun: an error event ends it
        list(ask(client, max_tokens=2, stream=True))
    monkeypatch.undo()
    assert ask(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_aligned_completion_equals_engine_on_the_real_model(smol_url, smol_aligner):
    client = OpenAI(base_url=smol_url, api_key=KEY, max_retries=0)
    options = {"method": "la", "principle": PRINCIPLE, "ratio": 2.0}
    reply = ask(client, max_tokens=24, extra_body={"linalign": options})
    align = AlignConfig(method="la", principles=[PRINCIPLE], ratio=2.0)
    assert reply.choices[0].message.content == expected(smol_aligner, QUESTION, align, 24).text


def test_system_as_principle_equals_an_explicit_la_request(smol_url):
    client = OpenAI(base_url=smol_url, api_key=KEY, max_retries=0)
    explicit = ask(client, max_tokens=24, extra_body={"linalign": {"principle": PRINCIPLE, "ratio": 2.0}})
    implicit = ask(client, [{"role": "system", "content": PRINCIPLE}, *QUESTION], max_tokens=24)
    assert implicit.choices[0].message.content == explicit.choices[0].message.content
    assert implicit.usage.model_dump() == explicit.usage.model_dump()


def test_dera_without_a_reference_model_is_400(smol_url):
    client = OpenAI(base_url=smol_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="reference model"):
        ask(client, max_tokens=4, extra_body={"linalign": {"method": "dera", "principle": PRINCIPLE, "lam": 0.5}})


def test_api_key_is_required_except_for_health(smol_url):
    with pytest.raises(openai.AuthenticationError):
        ask(OpenAI(base_url=smol_url, api_key="wrong", max_retries=0), max_tokens=2)
    response = httpx.get(f"{smol_url}/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(smol_url.removesuffix("/v1") + "/health").status_code == 200


def test_concurrent_requests_are_batched_and_equal_their_solo_results(client, server, tiny_aligner):
    principles = [PRINCIPLE, "Be brief.", "Talk like a pirate.", "Use formal English."]
    barrier, replies = threading.Barrier(len(principles)), {}

    def request(principle: str) -> None:
        barrier.wait()
        replies[principle] = ask(client, max_tokens=12, extra_body={"linalign": {"principle": principle}})

    batches_before = len(server[1].batch_sizes)
    threads = [threading.Thread(target=request, args=(p,)) for p in principles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(server[1].batch_sizes[batches_before:]) > 1
    for p in principles:
        solo = expected(tiny_aligner, QUESTION, AlignConfig(method="la", principles=[p]), 12)
        assert replies[p].choices[0].message.content == solo.text


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_has_its_row_cancelled(server, stream):
    base_url, batcher = server
    cancelled_before = batcher.finished["cancelled"]
    body = {"messages": QUESTION, "max_tokens": 470, "stream": stream}  # most of the context
    if stream:
        with httpx.stream("POST", f"{base_url}/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line and json.loads(line.removeprefix("data: "))["choices"][0]["delta"].get("content"):
                    break  # decoding has begun
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    deadline = time.monotonic() + 10
    while batcher.finished["cancelled"] == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.finished["cancelled"] == cancelled_before + 1


def test_amulet_and_several_principles_equal_the_engine(client, tiny_aligner):
    amulet = {"method": "amulet", "principle": PRINCIPLE, "amulet_iterations": 5}
    reply = ask(client, max_tokens=6, extra_body={"linalign": amulet})
    align = AlignConfig(method="amulet", principles=[PRINCIPLE], amulet_iterations=5)
    assert reply.choices[0].message.content == expected(tiny_aligner, QUESTION, align, 6).text
    several = {"method": "la", "principles": [PRINCIPLE, "Be rude."], "weights": [3.0, -1.0]}
    reply = ask(client, max_tokens=6, extra_body={"linalign": several})
    align = AlignConfig(method="la", principles=[PRINCIPLE, "Be rude."], weights=[3.0, -1.0])
    assert reply.choices[0].message.content == expected(tiny_aligner, QUESTION, align, 6).text
