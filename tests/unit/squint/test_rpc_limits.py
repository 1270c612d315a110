"""The server kit's limits: undecodable and oversize requests, per-client identity, call timeouts."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio
import pytest

from squint import errors
from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc as pb_grpc
from squint.rpc import (
    AuthSettings,
    GrpcServerSettings,
    call_timeout,
    client_identity,
    create_server,
    current_client,
    error_from_rpc,
    status_for,
)

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
GENERATE = f"/{SERVICE}/Generate"
GENERATE_STREAM = f"/{SERVICE}/GenerateStream"


class WhoAsks(pb_grpc.GenerationServiceServicer):
    """Answers with the caller's identity as the server sees it."""

    async def Generate(self, request, context):
        return pb.GenerateResponse(text=client_identity(context))

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(text=client_identity(context))


def run(calls, max_receive: int = 1 << 20, tokens: tuple[str, ...] = ()):
    async def scenario():
        def add(server):
            pb_grpc.add_GenerationServiceServicer_to_server(WhoAsks(), server)
            return [SERVICE]

        settings = GrpcServerSettings(port=0, max_receive_message_bytes=max_receive)
        serving = create_server(settings, "test", add, auth=AuthSettings(tokens=tokens))
        await serving.start()
        try:
            async with grpc.aio.insecure_channel(serving.address) as channel:
                return await calls(channel)
        finally:
            await serving.stop(0)

    return asyncio.run(scenario())


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05abc", b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"])
def test_bytes_that_are_not_the_request_message_are_invalid_argument(data):
    async def calls(channel):
        codes = []
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await channel.unary_unary(GENERATE)(data, timeout=10)
        codes.append((unary.value.code(), unary.value.details()))
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in channel.unary_stream(GENERATE_STREAM)(data, timeout=10):
                pass
        codes.append((stream.value.code(), stream.value.details()))
        return codes

    for code, details in run(calls):
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("the request is not a valid message for /squint.generate.v1.GenerationService/")
        assert "DecodeError" not in details and "Traceback" not in details


def test_a_request_over_max_receive_message_bytes_is_resource_exhausted():
    async def calls(channel):
        stub = pb_grpc.GenerationServiceStub(channel)
        small = await stub.Generate(pb.GenerateRequest(system_prompt="x" * 900), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await stub.Generate(pb.GenerateRequest(system_prompt="x" * 2000), timeout=10)
        return small, big.value

    small, big = run(calls, max_receive=1000)
    assert small.text.startswith("peer ipv4:127.0.0.1")
    assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max (2003 vs. 1000)" in big.details()


def test_a_client_is_its_token_when_tokens_are_configured_else_its_address():
    async def calls(channel):
        stub = pb_grpc.GenerationServiceStub(channel)
        a = await stub.Generate(pb.GenerateRequest(), metadata=(("authorization", "Bearer a-token"),), timeout=10)
        again = await stub.Generate(pb.GenerateRequest(), metadata=(("authorization", "Bearer a-token"),), timeout=10)
        b = [
            r async for r in stub.GenerateStream(pb.GenerateRequest(), metadata=(("authorization", "Bearer b-token"),))
        ]
        return a.text, again.text, b[0].text

    a, again, b = run(calls, tokens=("a-token", "b-token"))
    assert a == again and a.startswith("token ") and b.startswith("token ") and a != b
    assert "a-token" not in a  # a hash of the token, never the token

    async def anonymous(channel):
        stub = pb_grpc.GenerationServiceStub(channel)
        # Without configured tokens, a made-up token does not make a new client.
        made_up = await stub.Generate(pb.GenerateRequest(), metadata=(("authorization", "Bearer x"),), timeout=10)
        return made_up.text

    assert run(anonymous) == "peer ipv4:127.0.0.1"


class Context:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize(
    ("peer", "identity"),
    [
        ("ipv4:10.1.2.3:51234", "peer ipv4:10.1.2.3"),
        ("ipv6:[::1]:40000", "peer ipv6:[::1]"),
        ("unix:/run/squint.sock", "peer unix:/run/squint.sock"),
    ],
)
def test_a_peer_is_its_host_without_the_port(peer, identity):
    token = current_client.set("")
    try:
        assert client_identity(Context(peer)) == identity
    finally:
        current_client.reset(token)


def test_quota_exceeded_is_resource_exhausted():
    assert status_for(errors.QuotaExceeded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # On the way back, RESOURCE_EXHAUSTED stays a budget error (the first match), with the same status.
    back = error_from_rpc(
        grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "full"), "w"
    )
    assert isinstance(back, errors.BudgetExceeded) and status_for(back) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_call_timeout_is_the_limit_or_what_the_deadline_leaves():
    assert call_timeout(300, None, "x") == 300
    assert 9 < call_timeout(300, time.monotonic() + 10, "x") <= 10
    assert call_timeout(5, time.monotonic() + 10, "x") == 5
    with pytest.raises(errors.DeadlineExceeded, match="the request's deadline passed before the LLM was called"):
        call_timeout(300, time.monotonic() - 0.1, "the LLM was called")
