"""The shared gRPC server kit, on a real server bound to loopback."""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from squint import errors
from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc as pb_grpc
from squint.rpc import GrpcServerSettings, create_server

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


class Raising(pb_grpc.GenerationServiceServicer):
    """Raises whatever the request's request_id names."""

    ERRORS = {
        "invalid": errors.InvalidRequest("chunks[3].text is too long"),
        "missing": errors.CompressorNotFound("compressor.name 'x' is not registered"),
        "budget": errors.BudgetExceeded("576 > 100"),
        "down": errors.UpstreamUnavailable("vision worker is unavailable"),
        "video": errors.Unsupported("video later"),
        "bug": KeyError("secret internal detail"),
    }

    async def Generate(self, request, context):
        raise self.ERRORS[request.request_id]

    async def GenerateStream(self, request, context):
        yield pb.GenerateStreamResponse(text="partial")
        raise self.ERRORS[request.request_id]


@pytest.fixture
def server():
    loop = asyncio.new_event_loop()

    def add(s):
        pb_grpc.add_GenerationServiceServicer_to_server(Raising(), s)
        return [SERVICE]

    async def start():
        serving = create_server(GrpcServerSettings(port=0), "test", add)
        await serving.start()
        return serving

    serving = loop.run_until_complete(start())
    yield loop, serving
    loop.run_until_complete(serving.stop(0))
    loop.close()


@pytest.mark.parametrize(
    ("which", "code", "details"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "chunks[3].text is too long"),
        ("missing", grpc.StatusCode.NOT_FOUND, "compressor.name 'x' is not registered"),
        ("budget", grpc.StatusCode.RESOURCE_EXHAUSTED, "576 > 100"),
        ("down", grpc.StatusCode.UNAVAILABLE, "vision worker is unavailable"),
        ("video", grpc.StatusCode.UNIMPLEMENTED, "video later"),
    ],
)
def test_domain_errors_map_to_their_status(server, which, code, details):
    loop, serving = server

    async def call():
        async with grpc.aio.insecure_channel(serving.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await pb_grpc.GenerationServiceStub(channel).Generate(pb.GenerateRequest(request_id=which))
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                async for _ in pb_grpc.GenerationServiceStub(channel).GenerateStream(
                    pb.GenerateRequest(request_id=which)
                ):
                    pass
            return unary.value, stream.value

    for error in loop.run_until_complete(call()):
        assert (error.code(), error.details()) == (code, details)


def test_unexpected_errors_are_internal_without_details(server, caplog):
    loop, serving = server

    async def call():
        async with grpc.aio.insecure_channel(serving.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await pb_grpc.GenerationServiceStub(channel).Generate(
                    pb.GenerateRequest(request_id="bug"), metadata=(("x-request-id", "req-42"),)
                )
            return raised.value

    with caplog.at_level(logging.ERROR, logger="squint.rpc"):
        error = loop.run_until_complete(call())
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error (request id req-42)"
    assert "secret" not in error.details()
    assert any("req-42" in r.getMessage() and r.exc_info for r in caplog.records)


def test_health_watch_streams_through_the_interceptor(server):
    loop, serving = server

    async def watch():
        async with grpc.aio.insecure_channel(serving.address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
            first = await call.read()
            await serving.set_serving(True)
            second = await call.read()
            call.cancel()
            return first.status, second.status

    assert loop.run_until_complete(watch()) == (
        health_pb2.HealthCheckResponse.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVING,
    )


def test_health_starts_not_serving_and_reflection_lists_the_service(server):
    loop, serving = server

    async def health():
        async with grpc.aio.insecure_channel(serving.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            before = (await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
            await serving.set_serving(True)
            after = (await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
            return before, after

    assert loop.run_until_complete(health()) == (
        health_pb2.HealthCheckResponse.NOT_SERVING,
        health_pb2.HealthCheckResponse.SERVING,
    )

    def list_services():
        with grpc.insecure_channel(serving.address) as channel:
            return set(ProtoReflectionDescriptorDatabase(channel).get_services())

    # The reflection client is synchronous: run it beside the server's event loop.
    services = loop.run_until_complete(asyncio.to_thread(list_services))
    assert {SERVICE, "grpc.health.v1.Health"} <= services


def test_a_stream_cancelled_while_a_write_waits_closes_the_servicers_generator_with_the_call():
    """grpc never closes a handler's generator; the interceptor's wrapping must, or the work behind
    it (an LLM request) goes on until the garbage collector finds it."""
    import inspect

    from squint.rpc import ErrorMappingInterceptor

    closed = []

    async def behavior(request, context):
        try:
            while True:
                yield pb.GenerateStreamResponse(text="more")
        finally:
            closed.append(True)

    class Context:
        """A call whose client stopped reading: the second write waits for good."""

        def __init__(self) -> None:
            self.writes = 0
            self.blocked = asyncio.Event()

        def invocation_metadata(self):
            return ()

        async def write(self, message) -> None:
            self.writes += 1
            if self.writes == 2:
                self.blocked.set()
                await asyncio.Event().wait()

    async def continuation(details):
        return grpc.unary_stream_rpc_method_handler(behavior)

    async def main():
        details = type("Details", (), {"method": f"/{SERVICE}/GenerateStream"})()
        handler = await ErrorMappingInterceptor("test").intercept_service(continuation, details)
        context = Context()

        async def serve():  # what grpc.aio's server does with a unary-stream handler, in both forms
            if inspect.isasyncgenfunction(handler.unary_stream):
                async for item in handler.unary_stream(pb.GenerateRequest(), context):
                    await context.write(item)
            else:
                await handler.unary_stream(pb.GenerateRequest(), context)

        call = asyncio.ensure_future(serve())
        await context.blocked.wait()
        call.cancel()  # the client cancels
        with pytest.raises(asyncio.CancelledError):
            await call
        return list(closed)  # now, before a finalizer could have run

    assert asyncio.run(main()) == [True]
