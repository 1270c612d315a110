"""Deadlines and cancellation through the real stack: the client's deadline ends the work
downstream, a cancelled stream frees its LLM slot, and the stack serves the next request."""

from __future__ import annotations

import time

import grpc
import pytest
from squint_test_stack import seconds_until_idle

from squint.app.client import build_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Far more tokens than a short deadline allows: the tiny model does not stop by itself.
LONG = 2048


def long_request(png, seed: int):
    return build_request("Describe it at length.", [png(seed)], compressor="avgpool", max_new_tokens=LONG)


def stream_until(call, deadline_s: float | None = None, tokens: int | None = None) -> tuple[list[float], str, object]:
    """Token arrival times, the finish reason, and the error that ended the stream (or None)."""
    times: list[float] = []
    finish, error = "", None
    try:
        for reply in call:
            times.extend(time.monotonic() for _ in reply.token_ids)
            finish = finish or reply.finish_reason
            if tokens is not None and len(times) >= tokens:
                call.cancel()
                break
    except grpc.RpcError as exc:
        error = exc
    return times, finish, error


def test_a_short_deadline_on_a_long_generation_is_deadline_exceeded_and_frees_the_slot(
    default_stack, default_client, png
):
    # The deadline must fall while tokens flow: a loaded machine can take the first 3 s on CLIP and
    # the prefill alone (a full run beside two training processes did), so a longer one is tried then.
    for deadline in (3.0, 6.0, 12.0):
        seconds_until_idle(default_stack)
        started = time.monotonic()
        times, finish, error = stream_until(default_client.GenerateStream(long_request(png, 41), timeout=deadline))
        expired = time.monotonic()
        assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if len(times) > 10:
            break
    assert finish == "" and len(times) > 10, "the generation was never under way when the deadline passed"
    assert expired - started < deadline + 1.0
    # The deadline reached the LLM worker: its slot is free long before the generation would end.
    per_token = (times[-1] - times[0]) / (len(times) - 1)
    left_s = (LONG - len(times)) * per_token
    idle_after = seconds_until_idle(default_stack)
    assert idle_after < left_s / 4, (idle_after, left_s)

    # The unary call: the same status, and the stack serves the next request.
    with pytest.raises(grpc.RpcError) as late:
        default_client.Generate(long_request(png, 42), timeout=2.0)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seconds_until_idle(default_stack) < left_s / 4
    reply = default_client.Generate(build_request("And now?", [png(43)], max_new_tokens=3), timeout=60)
    assert len(reply.token_ids) == 3 and reply.finish_reason == "length"


def test_a_cancelled_stream_frees_its_llm_slot_and_the_next_request_starts_at_once(default_stack, default_client, png):
    seconds_until_idle(default_stack)
    sent_at = time.monotonic()
    times, finish, error = stream_until(default_client.GenerateStream(long_request(png, 44), timeout=120), tokens=20)
    cancelled_at = time.monotonic()
    assert error is None and finish == "" and len(times) >= 20
    # From the send, not between tokens: vLLM may deliver several tokens in one response.
    per_token = (times[-1] - sent_at) / len(times)
    left_s = (LONG - len(times)) * per_token
    idle_after = seconds_until_idle(default_stack)
    assert idle_after < 2.0 and idle_after < left_s / 4, (idle_after, left_s)

    following = default_client.GenerateStream(build_request("Next?", [png(45)], max_new_tokens=2), timeout=60)
    times, finish, error = stream_until(following)
    assert error is None and finish == "length" and len(times) == 2
    assert times[0] - cancelled_at < 5.0
