"""The HTTP layer: OpenAI's chat completions API over an `Aligner`, the alignment chosen per request.

Clients choose the method with an extra body object (`extra_body={"linalign": {...}}` with the official
client). With `system_as_principle`, a request's own system message becomes the principle instead, so
unmodified clients get aligned output.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from linalign.config import AlignConfig, DecodeConfig, row_seed
from linalign.decode import Prepared
from linalign.engine import Aligner
from linalign.errors import LinalignError
from linalign.generation import Generation, TopLogprobs, usage
from linalign.params import DECODE, KNOBS, MAX_STRENGTH, check, for_method
from linalign.prompts import Conversation, to_conversation
from linalign.resolve import align_configs, decode_config
from linalign.serve.batcher import (
    Batcher,
    DecodingFailed,
    Job,
    QueueFull,
    RequestTimedOut,
    ShuttingDown,
)
from linalign.serve.metrics import ServerMetrics
from linalign.serve.playground import mount_playground
from linalign.serve.schemas import MAX_LOGPROB_ENTRIES, ChatCompletionRequest

DEFAULT_MAX_TOKENS = 256


class APIError(Exception):
    """An error answered in OpenAI's shape, so clients raise their usual exception types."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return _JSON({"error": self.body()}, status_code=self.status)


class _JSON(JSONResponse):
    """A JSON response that survives text no UTF-8 encoder takes (a lone surrogate a client sent, echoed in an
    error message): such characters leave as `\\udXXXX` escapes instead of failing the response with a 500."""

    def render(self, content: object) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


@contextmanager
def _invalid(param: str | None) -> Iterator[None]:
    """Answer the engine's validation errors as a 400 about the request field the error names (an alignment
    knob under `linalign`, a decoding one by its OpenAI name), else about `param`."""
    try:
        yield
    except LinalignError as err:
        raise APIError(400, str(err), _request_param(err.param) or param) from err


def _request_param(name: str | None) -> str | None:
    """A knob's field in the request: a decoding knob's OpenAI name, an alignment knob's under `linalign`."""
    if name is None:
        return None
    return {k.name: k.request or k.name for k in DECODE}.get(name, f"linalign.{name}")


def _align(
    body: ChatCompletionRequest, messages: Conversation, system_as_principle: bool, ratio: float
) -> tuple[AlignConfig, Conversation]:
    options = body.linalign
    with _invalid("linalign"):
        if options is not None:
            knobs = for_method(options.method, {"ratio": ratio}) | options.knobs()
            return align_configs([options.method], options.principle_list(), knobs)[0], messages
        if system_as_principle and messages[0]["role"] == "system" and messages[0]["content"].strip():
            return align_configs(["la"], [messages[0]["content"]], {"ratio": ratio})[0], messages[1:]
    return AlignConfig(method="base"), messages


def _decode(body: ChatCompletionRequest, max_new_tokens: int) -> DecodeConfig:
    with _invalid(None):
        return decode_config(
            max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else body.stop,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )


def _max_tokens(aligner: Aligner, prepared: Prepared, requested: int | None) -> int:
    fit = aligner.room(prepared)
    if fit is None:
        return requested or DEFAULT_MAX_TOKENS
    left, context = fit
    if requested is None:
        return min(DEFAULT_MAX_TOKENS, left)
    if requested > left:
        raise APIError(
            400,
            f"max_tokens={requested} exceeds the context: the prompt takes {context - left} of the model's "
            f"{context} tokens, leaving {left}",
            "max_tokens",
        )
    return requested


def build_job(
    body: ChatCompletionRequest,
    aligner: Aligner,
    loop: asyncio.AbstractEventLoop,
    *,
    system_as_principle: bool,
    ratio: float,
    max_sequences: int,
    timeout: float | None = None,
) -> Job:
    """Validate a request completely (the engine's own checks included) and prepare every copy of it;
    `max_sequences` is the most copies (`n`) one request may ask for."""
    with _invalid("messages"):
        messages = to_conversation([m.as_dict() for m in body.messages])
    align, messages = _align(body, messages, system_as_principle, ratio)
    probe = _decode(body, 1)
    if body.n > 1 and not probe.do_sample:
        raise APIError(400, "n > 1 needs temperature > 0: greedy copies would all be the same", "n")
    if body.n > max_sequences:
        raise APIError(
            400,
            f"n must be at most {max_sequences}: one request holds at most that many of the server's sequences "
            "(the rest are kept for short requests)",
            "n",
        )
    with _invalid("messages"):  # a prompt too long for the context
        prepared = aligner.prepare(messages, align, probe)
    requested = body.max_completion_tokens or body.max_tokens
    config = replace(probe, max_new_tokens=_max_tokens(aligner, prepared, requested))
    entries = body.n * config.max_new_tokens * (body.top_logprobs or 0)
    if entries > MAX_LOGPROB_ENTRIES:
        raise APIError(
            400,
            f"n x max_tokens x top_logprobs = {body.n} x {config.max_new_tokens} x {body.top_logprobs} = {entries} "
            f"exceeds the server's limit of {MAX_LOGPROB_ENTRIES} log-probability entries; lower one of them",
            "top_logprobs",
        )
    seeds = [row_seed(config.seed, c) for c in range(body.n)]
    return Job([replace(prepared, config=config, seed=seed) for seed in seeds], loop, timeout=timeout)


def _job_error(err: Exception) -> APIError:
    if isinstance(err, RequestTimedOut):
        return APIError(504, f"{err} (--request-timeout)", code="timeout")
    if isinstance(err, ShuttingDown):
        return APIError(503, str(err), code="server_shutting_down")
    return APIError(500, f"decoding failed: {err} (the server's log has the traceback)")


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's `bytes_to_unicode`) inverted: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class TokenTexts:
    """Each token's text and its raw bytes, as OpenAI's logprobs entries carry them, worked out once per token.

    A token that holds part of a multi-byte character (half an emoji) decodes to the replacement character, so
    its bytes come from the vocabulary itself: byte-level BPE maps every byte to a character, SentencePiece
    spells byte tokens `<0xF0>` and spaces `▁`. Concatenating the bytes of a reply's tokens gives its UTF-8 text.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and "ByteLevel" in str(backend.decoder)
        self.special = set(getattr(tokenizer, "all_special_ids", ())) | set(tokenizer.get_added_vocab().values())
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            text = self.tokenizer.decode([token])
            self._cache[token] = (text, list(self._bytes(token, text)))
        return self._cache[token]

    def _bytes(self, token: int, text: str) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if token in self.special or not isinstance(piece, str):
            return text.encode()
        if self.byte_level and all(c in _BYTE_DECODER for c in piece):
            return bytes(_BYTE_DECODER[c] for c in piece)
        if match := _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        if "\u2581" in piece:  # SentencePiece's word boundary
            return piece.replace("\u2581", " ").encode()
        return text.encode()

    def entry(self, token: int, logprob: float) -> dict:
        text, raw = self(token)
        # Masked tokens have -inf, which JSON cannot carry: OpenAI's floor for "impossible" instead.
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": raw}

    def candidates(self, top: list[tuple[int, float]]) -> list[dict]:
        return [self.entry(token, logprob) for token, logprob in top]


def _logprobs_content(texts: TokenTexts, token: int, lp: TopLogprobs) -> dict:
    """OpenAI's per-token logprobs entry, with linalign's principled and plain candidates beside it."""
    entry = texts.entry(token, lp.logprob) | {"top_logprobs": texts.candidates(lp.aligned)}
    if lp.principled is not None:
        entry["linalign"] = {"principled": texts.candidates(lp.principled), "plain": texts.candidates(lp.plain or [])}
    return entry


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    # The body is read already, so the next message can only be the client hanging up.
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _sse(job: Job, head: dict, texts: TokenTexts, include_usage: bool) -> AsyncIterator[bytes]:
    def event(choices: list[dict], **extra) -> bytes:
        return format_sse_event(data_str=json.dumps(head | {"choices": choices} | extra))

    yield event(
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(job.n)]
    )
    try:
        async for deltas in job.events():
            for d in deltas:
                choice = {"index": d.index, "delta": {"content": d.text} if d.text else {}}
                if d.logprobs and d.token is not None:
                    choice["logprobs"] = {"content": [_logprobs_content(texts, d.token, d.logprobs[0])]}
                yield event([choice | {"finish_reason": d.finish_reason}])
        if include_usage:
            yield event([], usage=usage(job.outputs))
    except (DecodingFailed, RequestTimedOut, ShuttingDown) as err:
        # The status line is long gone; OpenAI's clients raise on an event that carries an error object.
        yield format_sse_event(data_str=json.dumps({"error": _job_error(err).body()}))
    yield format_sse_event(data_str="[DONE]")


class _RequireKey:
    """Check the API key before anything reads the body: a client without the key learns nothing else.
    `/health` and the playground's page stay open; the API, its docs and the metrics need the key."""

    OPEN = ("/health",)
    GUARDED = ("/v1", "/docs", "/redoc", "/openapi.json", "/metrics")

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(self.GUARDED):
            problem = self._problem(Headers(scope=scope).get("authorization", ""))
            if problem is not None:
                return await problem.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def _problem(self, header: str) -> APIError | None:
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return APIError(401, "no API key given: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not secrets.compare_digest(key.strip().encode(), self.api_key):
            return APIError(401, "incorrect API key", code="invalid_api_key")
        return None


def _body_too_large(max_body_bytes: int) -> APIError:
    return APIError(400, f"the request body exceeds the server's limit of {max_body_bytes} bytes")


class _DeclaredBodyLimit:
    """Refuse a body whose declared length is over the limit with OpenAI's 400.

    The route's own `max_body_size` stops bodies sent without a length, but a declared one too long gets
    Starlette's plain-text 413 whatever the exception handlers say, so those are refused before the route.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = Headers(scope=scope).get("content-length", "") if scope["type"] == "http" else ""
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _body_too_large(self.max_body_bytes).response()(scope, receive, send)
        await self.app(scope, receive, send)


def _install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Every error leaves in OpenAI's shape; bad input is a 400, whatever part of the stack caught it."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(LinalignError)
    async def linalign_error(request: Request, err: LinalignError) -> JSONResponse:
        return APIError(400, str(err)).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for e in err.errors():
            if e["type"] == "json_invalid":
                problems.append(f"the body is not valid JSON: {e['ctx']['error']} (at character {e['loc'][-1]})")
                continue
            param = _param(e["loc"])
            message = "must be a finite number" if e["type"] == "finite_number" else e["msg"]
            if not param:  # e.g. curl's default form encoding: FastAPI parses only JSON bodies as objects
                problems.append(f"the body must be a JSON object sent as application/json: {message}")
                continue
            params.append(param)
            problems.append(f"{param}: {message}")
        return APIError(400, "; ".join(dict.fromkeys(problems)), params[0] if params else None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 413:  # the route's max_body_size stopped a body sent without a length
            return _body_too_large(max_body_bytes).response()
        return APIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(DecodingFailed)
    async def decoding_failed(request: Request, err: DecodingFailed) -> JSONResponse:
        return _job_error(err).response()

    @app.exception_handler(RequestTimedOut)
    async def timed_out(request: Request, err: RequestTimedOut) -> JSONResponse:
        return _job_error(err).response()

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, err: ShuttingDown) -> JSONResponse:
        return _job_error(err).response()


_UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict"}


def _param(loc: tuple) -> str:
    """A validation error's location as OpenAI names a parameter (`messages.0.content`): without the body and
    the tags pydantic gives the branches of a union (`constrained-str`, `list[TextPart]`)."""
    names = [str(p) for p in loc[1 if loc[:1] == ("body",) else 0 :] if isinstance(p, int) or not _union_branch(str(p))]
    return ".".join(names)


def _union_branch(part: str) -> bool:
    return part in _UNION_BRANCHES or "[" in part or "-" in part


def check_options(
    *,
    ratio: float,
    max_batch: int,
    max_body_bytes: int,
    max_queue: int,
    request_timeout: float | None,
    shutdown_grace: float,
    prefill_chunk: int = 256,
    **_others: object,
) -> None:
    """Refuse the server options `create_app` cannot serve with (where they start: before any model loads)."""
    if not shutdown_grace >= 0:
        raise LinalignError(f"shutdown_grace must be >= 0 seconds, got {shutdown_grace}")
    sizes = ("max_batch", max_batch), ("max_body_bytes", max_body_bytes), ("max_queue", max_queue)
    for name, value in (*sizes, ("prefill_chunk", prefill_chunk)):
        if value < 1:
            raise LinalignError(f"{name} must be >= 1, got {value}")
    if request_timeout is not None and not request_timeout > 0:
        raise LinalignError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    check(KNOBS["ratio"], ratio)  # a bad --ratio fails at start, not per request
    if ratio > MAX_STRENGTH:
        raise LinalignError(f"ratio must be at most {MAX_STRENGTH:g}, as in a request, got {ratio}")


def create_app(
    aligner: Aligner,
    *,
    api_key: str | None = None,
    system_as_principle: bool = False,
    ratio: float = 2.0,
    max_batch: int = 16,
    batch_window: float = 0.02,
    max_body_bytes: int = 1 << 20,
    model_name: str | None = None,
    max_queue: int = 256,
    request_timeout: float | None = None,
    shutdown_grace: float = 10.0,
    prefill_chunk: int = 256,
) -> FastAPI:
    """The app serving `aligner`; `app.state.batcher` is its worker, started and stopped with the app.

    `app.state.begin_shutdown()` starts a bounded shutdown (`linalign.serve.server.Server` calls it on the first
    signal): nothing more is admitted, running requests get `shutdown_grace` seconds to finish, and each one still
    running then ends with a final error event (streams) or a 503.
    """
    check_options(
        ratio=ratio,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        max_queue=max_queue,
        request_timeout=request_timeout,
        shutdown_grace=shutdown_grace,
        prefill_chunk=prefill_chunk,
    )
    name = model_name or aligner.main.name
    metrics = ServerMetrics()
    batcher = Batcher(
        aligner,
        max_batch=max_batch,
        window=batch_window,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await run_in_threadpool(batcher.close, shutdown_grace)

    app = FastAPI(title="linalign", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.shutdown_grace = shutdown_grace
    app.state.begin_shutdown = lambda: batcher.drain(shutdown_grace)
    texts = TokenTexts(aligner.tokenizer)
    app.add_middleware(_DeclaredBodyLimit, max_body_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(_RequireKey, api_key=api_key)
    _install_error_handlers(app, max_body_bytes)
    v1 = APIRouter(prefix="/v1")

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health() -> JSONResponse:
        status = "dead" if not batcher.alive else "shutting_down" if batcher.draining else "ok"
        body = {"status": status, "model": name}
        body |= {"queued": batcher.queued, "running": batcher.running, "batches": len(batcher.batch_sizes)}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    model = {"id": name, "object": "model", "created": 0, "owned_by": "linalign"}

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model]}

    @v1.get("/models/{model_id:path}")
    async def one_model(model_id: str) -> dict:
        if model_id != name:
            raise APIError(
                404, f"the model {model_id!r} does not exist; this server has {name!r}", "model", "model_not_found"
            )
        return model

    @v1.post("/chat/completions", response_model=None, max_body_size=max_body_bytes)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | EventSourceResponse:
        # Templating and tokenising a long conversation would stall the event loop; do it on a thread.
        try:
            job = await run_in_threadpool(
                build_job,
                body,
                aligner,
                asyncio.get_running_loop(),
                system_as_principle=system_as_principle,
                ratio=ratio,
                max_sequences=batcher.share,
                timeout=request_timeout,
            )
            batcher.submit(job)
            job.arm()
        except (APIError, LinalignError) as err:
            metrics.rejected.labels(reason="invalid").inc()
            raise err
        except ShuttingDown as err:
            metrics.rejected.labels(reason="shutting_down").inc()
            refused = _job_error(err).response()
            refused.headers["Retry-After"] = "1"
            return refused
        except QueueFull as err:
            metrics.rejected.labels(reason="queue_full").inc()
            retry = APIError(429, f"{err}; retry later", code="queue_full").response()
            retry.headers["Retry-After"] = "1"
            return retry
        metrics.requests.inc()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = _sse(job, head | {"object": "chat.completion.chunk"}, texts, include_usage)
            # Runs once the stream ends or the client hangs up; a finished job ignores it.
            return EventSourceResponse(chunks, background=BackgroundTask(job.cancel))
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            outputs = await job.collect()
        finally:
            watcher.cancel()
        choices = _choices(outputs, texts)
        return _JSON(head | {"object": "chat.completion"} | choices)

    app.include_router(v1)
    mount_playground(app)
    return app


def _choices(outputs: list[Generation], texts: TokenTexts) -> dict:
    choices = [
        {
            "index": g.index,
            "message": {"role": "assistant", "content": g.text},
            "finish_reason": g.finish_reason,
            "logprobs": None
            if g.logprobs is None
            else {"content": [_logprobs_content(texts, t, lp) for t, lp in zip(g.token_ids, g.logprobs, strict=True)]},
        }
        for g in outputs
    ]
    return {"choices": choices, "usage": usage(outputs)}
