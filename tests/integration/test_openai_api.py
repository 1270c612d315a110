"""The OpenAI-compatible HTTP API of a real stack, through the official ``openai`` client."""

from __future__ import annotations

import base64

import openai
import pytest

from bench.media import Images
from squint.generate.v1 import generate_pb2 as pb

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_TOKENS = 12
# Far more tokens than the disconnect test waits for: the tiny model does not stop by itself.
LONG_ANSWER = 2048


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def client(default_stack):
    base_url = default_stack.orchestrator_http_url
    assert base_url, "the stack serves the HTTP API"
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as api:
        yield api


@pytest.fixture(scope="module")
def model(client) -> str:
    [served] = client.models.list().data
    return served.id


def test_models_and_health(default_stack, client, model, tiny_pack):
    import urllib.request

    assert model == tiny_pack.name
    health = default_stack.orchestrator_http_url.removesuffix("/v1") + "/health"
    assert urllib.request.urlopen(health, timeout=10).status == 200


def test_answers_equal_the_grpc_answers_streaming_or_not(client, model, default_client, png):
    image = png(11, 280, 210)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image)}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        },
        {"role": "assistant", "content": "Some shapes."},
        {"role": "user", "content": "Which colours?"},
    ]
    grpc_reply = default_client.Generate(
        pb.GenerateRequest(
            messages=[
                pb.Message(
                    role="user",
                    content=[pb.Chunk(image=pb.Image(data=image)), pb.Chunk(text="What is in the picture?")],
                ),
                pb.Message(role="assistant", content=[pb.Chunk(text="Some shapes.")]),
                pb.Message(role="user", content=[pb.Chunk(text="Which colours?")]),
            ],
            sampling=pb.SamplingParams(max_new_tokens=MAX_TOKENS),
        )
    )
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert answer.choices[0].message.content == grpc_reply.text
    assert answer.usage.completion_tokens == len(grpc_reply.token_ids)
    assert answer.usage.prompt_tokens == grpc_reply.usage.prompt_tokens
    assert answer.choices[0].finish_reason == grpc_reply.finish_reason

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == grpc_reply.text
    assert chunks[-1].usage.total_tokens == grpc_reply.usage.prompt_tokens + len(grpc_reply.token_ids)


def test_two_images_and_a_video_under_one_budget_with_squint_extensions(client, model, png):
    video = Images((96, 96)).video(frames=16, fps=8, side=96)
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png(12, 200, 200))}},
                    {"type": "image_url", "image_url": {"url": data_url(png(13, 240, 180))}},
                    {"type": "video_url", "video_url": {"url": data_url(video, "video/mp4")}},
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        max_tokens=4,
        extra_body={
            "visual_token_budget": 300,
            "compressor": {"name": "avgpool", "params": {"stride": 2}},
            "allocation_policy": "uniform",
        },
    )
    squint = reply.usage.model_extra["squint"]
    kinds = [m["kind"] for m in squint["media"]]
    assert kinds[:2] == ["image", "image"] and set(kinds[2:]) == {"video_frame"} and len(kinds) > 3
    assert all(m["compressor"] == "avgpool" for m in squint["media"])
    assert squint["visual_tokens"] <= 300 and squint["visual_token_budget"] == 300
    assert squint["visual_tokens"] == sum(m["tokens_after"] for m in squint["media"])


def test_refusals_come_back_as_openai_errors(client, model):
    with pytest.raises(openai.BadRequestError, match="n is 2"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="the file URL scheme is refused"):
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hosts"}}]}],
        )
    with pytest.raises(openai.BadRequestError, match=r"pixel_dedup_threshold is 5.0; it must be between 0 and 2"):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], extra_body={"pixel_dedup_threshold": 5}
        )
    # Still serving.
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def long_answer_body(model: str, png, stream: bool) -> dict:
    """A request the tiny pack answers greedily for all of LONG_ANSWER tokens (no early EOS)."""
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png(46))}},
        {"type": "text", "text": "Describe it at length."},
    ]
    return {
        "model": model,
        "max_tokens": LONG_ANSWER,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
        "compressor": {"name": "avgpool"},
    }


def test_a_client_that_disconnects_mid_stream_frees_its_llm_slot(default_stack, model, png):
    import httpx
    from squint_test_stack import generated_tokens, llm_request_outcomes, seconds_until_idle

    assert seconds_until_idle(default_stack, limit=120) < 120, "an earlier request still holds an LLM slot"
    body = long_answer_body(model, png, stream=True)
    for _attempt in range(3):
        before = sum(generated_tokens(default_stack).values())
        cancelled_before = llm_request_outcomes(default_stack).get("cancelled", 0.0)
        with httpx.Client(base_url=default_stack.orchestrator_http_url, timeout=120) as http:
            with http.stream("POST", "/chat/completions", json=body) as reply:
                assert reply.status_code == 200
                deltas = 0
                for line in reply.iter_lines():
                    # A text delta; the first chunk (the role, with empty content) is not one.
                    deltas += line.startswith("data: ") and '"content":"' in line and '"content":""' not in line
                    if deltas >= 20:
                        at_leave = sum(generated_tokens(default_stack).values()) - before
                        break  # leaving the block closes the connection mid-stream
        assert seconds_until_idle(default_stack, limit=300) < 300, "the slot was never freed"
        if at_leave < LONG_ANSWER:
            break
        # On a loaded machine the worker runs ahead of the client it streams to (a full run beside
        # two training processes had the whole answer generated before the client left): the
        # client did not leave mid-answer, so this try tells nothing; ask again.
    else:
        pytest.fail("in three tries the worker finished the answer before the client had 20 deltas")
    # Freed because the client left, not because the answer ended: the request to the LLM worker
    # ended cancelled, before its last token. (The tiny pack's greedy answer to this request runs the
    # whole LONG_ANSWER: no early EOS.) No bound in seconds or tokens, for the same reason.
    generated = sum(generated_tokens(default_stack).values()) - before
    assert deltas <= generated < LONG_ANSWER, generated
    assert llm_request_outcomes(default_stack).get("cancelled", 0.0) == cancelled_before + 1


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_llm_slot(default_stack, model, png):
    """Not streaming: the client waits for the whole answer, and leaves while it is generated."""
    import json
    import socket
    import time
    import urllib.parse

    from squint_test_stack import generated_tokens, llm_request_outcomes, seconds_until_idle

    assert seconds_until_idle(default_stack, limit=120) < 120, "an earlier request still holds an LLM slot"
    url = urllib.parse.urlsplit(default_stack.orchestrator_http_url)
    payload = json.dumps(long_answer_body(model, png, stream=False)).encode()
    head = (
        f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    before = sum(generated_tokens(default_stack).values())
    cancelled_before = llm_request_outcomes(default_stack).get("cancelled", 0.0)
    with socket.create_connection((url.hostname, url.port), timeout=120) as connection:
        connection.sendall(head + payload)
        started = time.monotonic()
        while sum(generated_tokens(default_stack).values()) == before:  # the answer is being generated
            assert time.monotonic() - started < 120, "the answer never started"
            time.sleep(0.02)
    # The client has gone; the request to the LLM worker ends cancelled, before its last token.
    assert seconds_until_idle(default_stack, limit=300) < 300, "the slot was never freed"
    assert sum(generated_tokens(default_stack).values()) - before < LONG_ANSWER
    assert llm_request_outcomes(default_stack).get("cancelled", 0.0) == cancelled_before + 1


def test_an_image_url_is_fetched_over_http_and_an_internal_one_refused(client, model, png, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    image = png(47, 220, 200)
    (tmp_path / "picture.png").write_bytes(image)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/picture.png"

        def ask(image_url: str):
            content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "What?"}]
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=MAX_TOKENS, temperature=0
            )

        fetched, inline = ask(url), ask(data_url(image))
        assert fetched.choices[0].message.content == inline.choices[0].message.content
        assert fetched.usage.model_extra["squint"]["media"][0]["tokens_before"] == 576
        with pytest.raises(openai.BadRequestError, match="127.0.0.2, a private, loopback"):
            ask(url.replace("127.0.0.1", "127.0.0.2"))
    finally:
        httpd.shutdown()


def test_detail_low_caps_an_image_and_leaves_the_others_to_the_budget(client, model, png):
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png(48, 200, 200)), "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": data_url(png(49, 200, 200)), "detail": "high"}},
                    {"type": "text", "text": "Compare."},
                ],
            }
        ],
        max_tokens=2,
        extra_body={"compressor": {"name": "avgpool", "params": {"stride": 2}}, "return_coverage": True},
    )
    low, high = reply.usage.model_extra["squint"]["media"]
    assert low["tokens_after"] == 64 and high["tokens_after"] == 144  # the cap (64) and the compressor's own
    # Each visual token's patches: 3x3 windows at stride 3 for the capped one, 2x2 for the other.
    assert len(low["coverage"]) == 64 and {len(c) for c in low["coverage"]} == {9} and low["grid"] == [24, 24]
    assert len(high["coverage"]) == 144 and {len(c) for c in high["coverage"]} == {4}


def test_http_requests_are_counted_on_the_orchestrators_metrics_page(default_stack, client, model):
    import re
    import urllib.request

    def served(status: str) -> float:
        page = urllib.request.urlopen(default_stack.orchestrator_metrics_url, timeout=10).read().decode()
        pattern = rf'^squint_http_requests_total\{{endpoint="/v1/chat/completions",status="{status}"\}} (\S+)$'
        found = re.search(pattern, page, re.M)
        return float(found.group(1)) if found else 0.0

    before_ok, before_refused = served("200"), served("404")
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    assert served("200") == before_ok + 1 and served("404") == before_refused + 1
