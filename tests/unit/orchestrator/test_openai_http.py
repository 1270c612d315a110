"""The HTTP front door against a fake core: the mapping of OpenAI bodies, refusals and errors."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient

from orchestrator.openai_http import _ClosingStreamingResponse, create_app
from orchestrator.types import (
    Finished,
    ImageChunk,
    MediaUsage,
    TextChunk,
    TextDelta,
    Timings,
    Usage,
)
from squint.errors import BudgetExceeded, CompressorNotFound, DeadlineExceeded, QuotaExceeded, UpstreamUnavailable

PNG = base64.b64encode(b"\x89PNG fake").decode()


class FakeCore:
    """Records each request; answers "hi there" or raises ``error`` before the first token."""

    def __init__(self, error: Exception | None = None) -> None:
        self.requests = []
        self.error = error
        self.closed = 0

    async def generate(self, request):
        self.requests.append(request)
        try:
            if self.error is not None:
                raise self.error
            yield TextDelta("hi", (1,))
            yield TextDelta(" there", (2,))
            coverage = ((0, 1, 24, 25),) if request.return_coverage else ()
            media = (
                MediaUsage(
                    0,
                    "image",
                    576,
                    64,
                    "avgpool",
                    False,
                    "k",
                    3.0,
                    "w",
                    (24, 24),
                    coverage=coverage,
                    allocated_tokens=64,
                ),
            )
            yield Finished("length", Usage(12, 2, 64, 100, media, Timings(5.0, 7.0, 9.0), "uniform"))
        finally:
            self.closed += 1


def client(core=None, tokens=()) -> TestClient:
    return TestClient(create_app(core or FakeCore(), ("world", "world-1234"), tokens))


def body(**fields):
    return {"model": "world", "messages": [{"role": "user", "content": "Hello?"}], **fields}


def test_a_conversation_with_images_and_extensions_maps_to_the_core_request():
    core = FakeCore()
    reply = client(core).post(
        "/v1/chat/completions",
        json=body(
            messages=[
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                        {"type": "text", "text": "What is it?"},
                    ],
                },
                {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": [{"type": "text", "text": "Its colour?"}]},
            ],
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            seed=3,
            stop="END",
            repetition_penalty=1.1,
            visual_token_budget=100,
            compressor={"name": "avgpool", "params": {"stride": 3}},
            allocation_policy="complexity",
            context_limit=900,
            return_coverage=True,
            dedup_threshold=0.9,
            pixel_dedup_threshold=1.5,
        ),
    )
    assert reply.status_code == 200, reply.text
    [request] = core.requests
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[1].chunks == (ImageChunk(b"\x89PNG fake"), TextChunk("What is it?"))
    assert request.compressor == "avgpool" and request.compressor_params == {"stride": 3}
    assert (request.visual_token_budget, request.allocation_policy, request.context_limit) == (100, "complexity", 900)
    assert (request.dedup_threshold, request.pixel_dedup_threshold) == (0.9, 1.5)
    s = request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (7, 0.5, 0.9, 5, 3, ("END",))
    answer = reply.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "world"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hi there"}
    assert answer["choices"][0]["finish_reason"] == "length"
    usage = answer["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (12, 2, 14)
    assert usage["squint"]["media"][0]["tokens_before"] == 576 and usage["squint"]["media"][0]["tokens_after"] == 64
    assert request.return_coverage and usage["squint"]["media"][0]["coverage"] == [[0, 1, 24, 25]]
    assert usage["squint"]["media"][0]["grid"] == [24, 24]


def test_streaming_sends_openai_chunks_then_usage_then_done():
    reply = client().post("/v1/chat/completions", json=body(stream=True, stream_options={"include_usage": True}))
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "hi there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 14


def test_a_client_gone_while_a_chunk_waits_to_be_sent_closes_the_body_at_once():
    """A slow reader's socket is full, so a send waits; the client leaves. The body (which holds the
    LLM request) must be closed when the response ends, not whenever the garbage collector finds it."""
    closed = []

    async def body():
        try:
            while True:
                yield b"data: {}\n\n"
        finally:
            closed.append(True)

    blocked = asyncio.Event()
    sent = []

    async def receive():
        await blocked.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body":
            sent.append(message["body"])
            if len(sent) == 2:  # the socket is full from here on
                blocked.set()
                await asyncio.Event().wait()

    async def main():
        response = _ClosingStreamingResponse(body(), media_type="text/event-stream")
        await response({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}, receive, send)
        return list(closed)  # now: asyncio.run closes what is left open only after this returns

    assert asyncio.run(main()) == [True]


class SlowCore:
    """Answers nothing until released (a long generation, or a long encode before the first token)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.closed = 0

    async def generate(self, request):
        try:
            self.started.set()
            await asyncio.Event().wait()
            yield TextDelta("never", (1,))
        finally:
            self.closed += 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_before_its_answer_is_ready_closes_the_core_stream(stream):
    """Whether it waits for the whole answer or for the stream's first token, a request whose client
    closed the connection is cancelled (the LLM request with it) and counted as 499."""
    from orchestrator.metrics import OrchestratorMetrics

    metrics = OrchestratorMetrics()
    core = SlowCore()
    app = create_app(core, ("world",), metrics=metrics)
    request_body = json.dumps(body(stream=stream)).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(request_body)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    messages = [{"type": "http.request", "body": request_body, "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await core.started.wait()  # the client leaves once its request is being answered
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    async def main():
        # Bounded only so that a regression fails rather than hangs: without the watch it never returns.
        await asyncio.wait_for(app(scope, receive, send), timeout=30)
        return core.closed

    assert asyncio.run(main()) == 1
    count = metrics.registry.get_sample_value(
        "squint_http_requests_total", {"endpoint": "/v1/chat/completions", "status": "499"}
    )
    assert count == 1


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"n": 2}, 400, "n is 2; this server returns one choice"),
        ({"logprobs": True}, 400, "logprobs is not supported"),
        ({"model": "gpt-4o"}, 404, "model 'gpt-4o' does not exist; this server serves 'world'"),
        ({"messages": []}, 400, "messages"),
        ({"temperature": -1}, 400, "temperature"),
        ({"max_tokens": "many"}, 400, "max_tokens"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}
                ]
            },
            400,
            r"messages[0].content[0].image_url.url: the file URL scheme is refused",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}],
                    }
                ]
            },
            400,
            "the data URL's base64 does not decode",
        ),
        ({"messages": [{"role": "user", "content": ""}]}, 400, "messages[0].content is empty"),
    ],
)
def test_refusals_name_the_field_with_openai_error_bodies(fields, status, message):
    core = FakeCore()
    reply = client(core).post("/v1/chat/completions", json=body(**fields))
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["type"]
    assert not core.requests


def test_malformed_json_is_a_400_not_a_500():
    reply = client().post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "error" in reply.json()


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (BudgetExceeded("too many visual tokens"), 400),
        (CompressorNotFound("compressor.name 'nope' is not registered"), 404),
        (QuotaExceeded("client has 128 streams in flight; the limit is 128"), 429),
        (UpstreamUnavailable("triton is down"), 503),
        (DeadlineExceeded("the deadline passed"), 504),
    ],
)
def test_core_errors_keep_their_status_streaming_or_not(error, status):
    for stream in (False, True):
        core = FakeCore(error)
        reply = client(core).post("/v1/chat/completions", json=body(stream=stream))
        assert reply.status_code == status and str(error) in reply.json()["error"]["message"]
        assert core.closed == 1  # the core's stream was closed


def test_tokens_guard_everything_but_health():
    api = client(tokens=(b"secret",))
    assert api.get("/health").status_code == 200
    assert api.get("/v1/models").status_code == 401
    refused = api.post("/v1/chat/completions", json=body())
    assert refused.status_code == 401 and "bearer token" in refused.json()["error"]["message"]
    assert api.post("/v1/chat/completions", json=body(), headers={"authorization": "Bearer wrong"}).status_code == 401
    ok = api.post("/v1/chat/completions", json=body(), headers={"authorization": "Bearer secret"})
    assert ok.status_code == 200
    models = api.get("/v1/models", headers={"authorization": "Bearer secret"}).json()
    assert [m["id"] for m in models["data"]] == ["world"]


def test_bodies_that_are_not_json_and_unknown_paths_get_openai_error_bodies():
    api = client()
    reply = api.post("/v1/chat/completions", content=b"\x80", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    missing = api.get("/v1/embeddings")
    assert missing.status_code == 404 and "error" in missing.json()


def test_requests_are_counted_by_endpoint_and_status():
    from orchestrator.metrics import OrchestratorMetrics

    metrics = OrchestratorMetrics()
    api = TestClient(create_app(FakeCore(), ("world",), metrics=metrics))
    api.post("/v1/chat/completions", json=body())
    api.post("/v1/chat/completions", json=body(n=3))
    api.get("/health")
    api.get("/nowhere")

    def count(endpoint: str, status: str) -> float:
        labels = {"endpoint": endpoint, "status": status}
        return metrics.registry.get_sample_value("squint_http_requests_total", labels) or 0.0

    assert count("/v1/chat/completions", "200") == 1 and count("/v1/chat/completions", "400") == 1
    assert count("/health", "200") == 1 and count("other", "404") == 1
