"""The OpenAI-compatible HTTP front door: chat completions over the same core as the gRPC API.

``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream``), ``GET /v1/models``
and ``GET /health``, served by uvicorn in the orchestrator's event loop. Request and response
follow OpenAI's chat-completions API; Squint's controls are extension fields the ``openai`` client
sends with ``extra_body`` (``visual_token_budget``, ``compressor``, ``allocation_policy``,
``context_limit``, ``dedup_threshold``, ``pixel_dedup_threshold``), and the usage carries a
``squint`` object with the same facts as the gRPC usage. Domain errors map once, here, to HTTP
statuses with OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.core import Orchestrator
from orchestrator.fetch import FetchSettings, MediaFetcher
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.types import (
    Chunk,
    Finished,
    GenerationRequest,
    ImageChunk,
    MediaUsage,
    Message,
    Sampling,
    TextChunk,
    TextDelta,
    Usage,
    VideoChunk,
)
from orchestrator.vision_client import VisionContext
from squint import errors

T = TypeVar("T")

# What the metrics count for a client that closed its connection before its answer (nginx's status;
# nothing is sent: the client is gone).
CLIENT_CLOSED_REQUEST = 499

# Each domain error's HTTP status and OpenAI error type, in one place.
STATUSES: tuple[tuple[type[errors.SquintError], int, str], ...] = (
    (errors.InvalidMedia, 400, "invalid_request_error"),
    (errors.InvalidRequest, 400, "invalid_request_error"),
    (errors.CompressorNotFound, 404, "not_found_error"),
    (errors.BudgetExceeded, 400, "invalid_request_error"),
    (errors.Unsupported, 400, "invalid_request_error"),
    (errors.QuotaExceeded, 429, "rate_limit_error"),
    (errors.ModelNotReady, 503, "service_unavailable"),
    (errors.UpstreamUnavailable, 503, "service_unavailable"),
    (errors.DeadlineExceeded, 504, "timeout"),
)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=status)


def status_of(exc: errors.SquintError) -> tuple[int, str]:
    for cls, status, kind in STATUSES:
        if isinstance(exc, cls):
            return status, kind
    return 500, "internal_error"


# --------------------------------------------------------------------------- the request


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Open):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class VideoURL(_Open):
    url: str


class ContentPart(_Open):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None


class ChatMessage(_Open):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class CompressorChoice(_Open):
    name: str = ""
    params: dict[str, Any] = Field(default_factory=dict)


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """OpenAI's fields, vLLM's ``top_k`` and ``repetition_penalty``, and Squint's extensions."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    # Squint's extensions.
    visual_token_budget: int = Field(default=0, ge=0, lt=2**32)
    compressor: CompressorChoice | None = None
    allocation_policy: str = ""
    context_limit: int = Field(default=0, ge=0, lt=2**32)
    return_coverage: bool = False  # each visual token's patches, in usage.squint.media[].coverage
    # Video frames dropped as repeats (None: the server's settings); the core checks the ranges.
    dedup_threshold: float | None = None
    pixel_dedup_threshold: float | None = None


async def _parts(message: ChatMessage, m: int, fetcher: MediaFetcher, low_tokens: int) -> tuple[Chunk, ...]:
    if message.content is None or message.content == "" or message.content == []:
        raise errors.InvalidRequest(f"messages[{m}].content is empty")
    if isinstance(message.content, str):
        return (TextChunk(message.content),)
    chunks: list[Chunk] = []
    for c, part in enumerate(message.content):
        field = f"messages[{m}].content[{c}]"
        if part.type == "text":
            if part.text is None:
                raise errors.InvalidRequest(f"{field}.text is missing")
            chunks.append(TextChunk(part.text))
        elif part.type == "image_url":
            if part.image_url is None:
                raise errors.InvalidRequest(f"{field}.image_url is missing")
            data = await fetcher.fetch(part.image_url.url, "image", f"{field}.image_url.url")
            chunks.append(ImageChunk(data, max_tokens=low_tokens if part.image_url.detail == "low" else 0))
        else:
            if part.video_url is None:
                raise errors.InvalidRequest(f"{field}.video_url is missing")
            chunks.append(VideoChunk(await fetcher.fetch(part.video_url.url, "video", f"{field}.video_url.url")))
    return tuple(chunks)


async def to_generation_request(
    body: ChatCompletionRequest, request_id: str, client: str, fetcher: MediaFetcher, low_tokens: int = 64
) -> GenerationRequest:
    """The core's request for an OpenAI body (after the model name was checked); media URLs fetched."""
    if body.n != 1:
        raise errors.InvalidRequest(f"n is {body.n}; this server returns one choice (n=1)")
    if body.logprobs:
        raise errors.InvalidRequest("logprobs is not supported by this server")
    messages = tuple(
        [
            Message(
                "system" if message.role == "developer" else message.role, await _parts(message, m, fetcher, low_tokens)
            )
            for m, message in enumerate(body.messages)
        ]
    )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    compressor = body.compressor or CompressorChoice()
    return GenerationRequest.of_conversation(
        messages,
        request_id,
        visual_token_budget=body.visual_token_budget,
        compressor=compressor.name,
        compressor_params=dict(compressor.params),
        sampling=Sampling(
            max_new_tokens=body.max_completion_tokens or body.max_tokens or 0,
            temperature=body.temperature or 0.0,
            top_p=body.top_p or 0.0,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed or 0,
            stop=stop,
            repetition_penalty=body.repetition_penalty or 0.0,
        ),
        allocation_policy=body.allocation_policy,
        context_limit=body.context_limit,
        return_coverage=body.return_coverage,
        dedup_threshold=body.dedup_threshold,
        pixel_dedup_threshold=body.pixel_dedup_threshold,
        client=client,
    )


# --------------------------------------------------------------------------- the response


def _media(m: MediaUsage) -> dict[str, Any]:
    coverage = {"grid": list(m.grid), "coverage": [list(c) for c in m.coverage]} if m.coverage else {}
    return {
        **coverage,
        "chunk_index": m.chunk_index,
        "kind": m.kind,
        "tokens_before": m.tokens_before,
        "tokens_after": m.tokens_after,
        "compressor": m.compressor,
        "cache_hit": m.cache_hit,
        "encode_ms": round(m.encode_ms, 3),
        "complexity": m.complexity,
        "allocated_tokens": m.allocated_tokens,
        "duplicate_of": m.duplicate_of,
        "timestamp": m.timestamp,
        "skipped_before_clip": m.skipped_before_clip,
    }


def usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage, with Squint's facts (the gRPC usage's) under ``squint``."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "squint": {
            "visual_tokens": usage.visual_tokens,
            "visual_token_budget": usage.visual_token_budget,
            "allocation_policy": usage.allocation_policy,
            "media": [_media(m) for m in usage.media],
            "frames": dataclasses.asdict(usage.frames),
            "timings": dataclasses.asdict(usage.timings),
        },
    }


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


# --------------------------------------------------------------------------- the app


def create_app(
    orchestrator: Orchestrator,
    model_ids: tuple[str, ...],
    tokens: tuple[bytes, ...] = (),
    fetch: FetchSettings = FetchSettings(),
    detail_low_tokens: int = 64,
    metrics: OrchestratorMetrics | None = None,
) -> FastAPI:
    """The HTTP app; ``model_ids[0]`` is the served name, every id is accepted as ``model``."""
    app = FastAPI(title="Squint", docs_url=None, redoc_url=None, openapi_url=None)
    fetcher = MediaFetcher(fetch)
    endpoints = ("/", "/health", "/v1/models", "/v1/chat/completions", "/v1/squint/compressors")

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        if metrics is not None:
            path = request.url.path
            endpoint = path if path in endpoints else "/playground" if path.startswith("/playground/") else "other"
            metrics.http_requests.labels(endpoint, str(response.status_code)).inc()
        return response

    served = model_ids[0]

    def identity(request: Request) -> str | None:
        """Who asks: the accepted token's identity, the client address without tokens, None when refused."""
        if not tokens:
            return f"http {request.client.host}" if request.client else "http"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        presented = token.strip().encode()
        matches = [hmac.compare_digest(presented, t) for t in tokens]
        if scheme.lower() == "bearer" and any(matches):
            return "token " + hashlib.sha256(presented).hexdigest()[:12]
        return None

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid body"))
        return error_response(400, message, "invalid_request_error", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # A body that is not JSON, an unknown path or method: OpenAI's error body, the same status.
        kind = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        if identity(request) is None:
            return _unauthorized()
        return {
            "object": "list",
            "data": [{"id": served, "object": "model", "created": 0, "owned_by": "squint", "root": model_ids[-1]}],
        }

    @app.get("/v1/squint/compressors")
    async def compressors(request: Request):
        """The compressors the vision workers run (what ``compressor.name`` may be)."""
        if identity(request) is None:
            return _unauthorized()
        context = VisionContext("", {}, "", request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex)
        try:
            listed = await orchestrator.vision.list_compressors(context)
        except errors.SquintError as exc:
            status, kind = status_of(exc)
            return error_response(status, str(exc), kind)
        return {"object": "list", "data": [dataclasses.asdict(c) for c in listed]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        client = identity(request)
        if client is None:
            return _unauthorized()
        if body.model not in model_ids:
            return error_response(
                404, f"model {body.model!r} does not exist; this server serves {served!r}", "not_found_error", "model"
            )
        request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
        try:
            # Watched too: fetching image URLs can take a while.
            domain = await _unless_client_leaves(
                request, to_generation_request(body, request_id, client, fetcher, detail_low_tokens)
            )
        except errors.SquintError as exc:
            status, kind = status_of(exc)
            return error_response(status, str(exc), kind)
        except _ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        completion_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        events = orchestrator.generate(domain)
        if not body.stream:
            try:
                return await _unless_client_leaves(request, _complete(events, completion_id, created, served))
            except _ClientGone:
                return Response(status_code=CLIENT_CLOSED_REQUEST)
        # Start the stream before answering 200, so an error before the first token keeps its status.
        try:
            first = await _unless_client_leaves(request, anext(events))
        except StopAsyncIteration:
            first = None
        except errors.SquintError as exc:
            await events.aclose()
            status, kind = status_of(exc)
            return error_response(status, str(exc), kind)
        except _ClientGone:
            await events.aclose()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _ClosingStreamingResponse(
            _stream(first, events, completion_id, created, served, include_usage),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache"},
        )

    return app


def _unauthorized() -> JSONResponse:
    return error_response(401, "missing or invalid bearer token (Authorization header)", "authentication_error")


async def _complete(events: AsyncIterator, completion_id: str, created: int, model: str) -> JSONResponse:
    text: list[str] = []
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                elif isinstance(event, Finished):
                    return JSONResponse(
                        {
                            "id": completion_id,
                            "object": "chat.completion",
                            "created": created,
                            "model": model,
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": "".join(text)},
                                    "finish_reason": _finish(event.finish_reason),
                                    "logprobs": None,
                                }
                            ],
                            "usage": usage_body(event.usage),
                        }
                    )
        except errors.SquintError as exc:
            status, kind = status_of(exc)
            return error_response(status, str(exc), kind)
    return error_response(500, "the generation ended without finishing", "internal_error")


def _chunk(completion_id: str, created: int, model: str, delta: dict, finish: str | None) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class _ClientGone(Exception):
    """The client closed its connection before the answer (or the stream's first token) was ready."""


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client closes its connection first: then ``work`` is cancelled
    (which closes the core's stream, and with it the LLM request) and :class:`_ClientGone` raised.
    Without this a client that gives up on a long answer keeps its LLM slot busy to the last token."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, listener), return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the body is read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ClosingStreamingResponse(StreamingResponse):
    """A streaming response that closes its body however the response ends.

    When the client goes away while a chunk waits to be sent (a slow reader: the socket's buffer is
    full), Starlette cancels the send and leaves the body generator suspended at its ``yield``, to be
    closed whenever the garbage collector finds it; until then the LLM request it holds goes on
    generating for no one. Closed here, after Starlette's cancel scope has ended, the close runs now.
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _stream(first, events: AsyncIterator, completion_id: str, created: int, model: str, include_usage: bool):
    """The SSE body. Closing it (the client went away) closes the core's stream: the LLM slot is freed."""
    async with contextlib.aclosing(events):
        yield _sse(_chunk(completion_id, created, model, {"role": "assistant", "content": ""}, None))
        event = first
        try:
            while event is not None:
                if isinstance(event, TextDelta) and event.text:
                    yield _sse(_chunk(completion_id, created, model, {"content": event.text}, None))
                elif isinstance(event, Finished):
                    yield _sse(_chunk(completion_id, created, model, {}, _finish(event.finish_reason)))
                    if include_usage:
                        body = _chunk(completion_id, created, model, {}, None)
                        yield _sse({**body, "choices": [], "usage": usage_body(event.usage)})
                    break
                event = await anext(events, None)
        except errors.SquintError as exc:
            status, kind = status_of(exc)
            yield _sse(error_body(str(exc), kind, code=str(status)))
        yield b"data: [DONE]\n\n"
