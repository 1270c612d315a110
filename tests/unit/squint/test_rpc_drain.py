"""Graceful shutdown of the shared gRPC server kit: in-flight calls finish, new ones are refused
with UNAVAILABLE, and a call still running after the grace period is ended."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc as pb_grpc
from squint.rpc import GrpcServerSettings, create_server

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


class Slow(pb_grpc.GenerationServiceServicer):
    """Streams five deltas, ``request_id`` tenths of a second apart (``Generate``: one wait)."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.calls = 0  # calls that reached the servicer (past the drain gate)

    async def Generate(self, request, context):
        self.calls += 1
        self.started.set()
        await asyncio.sleep(float(request.request_id) / 10)
        return pb.GenerateResponse(text="done", finish_reason="stop")

    async def GenerateStream(self, request, context):
        self.calls += 1
        self.started.set()
        for n in range(5):
            await asyncio.sleep(float(request.request_id) / 10)
            yield pb.GenerateStreamResponse(text=str(n))
        yield pb.GenerateStreamResponse(finish_reason="stop")


async def _serve(servicer: Slow):
    def add(server):
        pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
        return [SERVICE]

    serving = create_server(GrpcServerSettings(port=0, shutdown_grace_seconds=30), "test server", add)
    await serving.start()
    await serving.set_serving(True)
    return serving


async def _stream(stub, request_id: str) -> list[str]:
    return [m.text or m.finish_reason async for m in stub.GenerateStream(pb.GenerateRequest(request_id=request_id))]


def test_a_draining_server_finishes_calls_in_flight_and_refuses_new_ones():
    async def scenario():
        servicer = Slow()
        serving = await _serve(servicer)
        async with grpc.aio.insecure_channel(serving.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            in_flight = asyncio.create_task(_stream(stub, "2"))
            unary = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(request_id="5")))
            while servicer.calls < 2:  # both in flight before the drain begins
                await asyncio.sleep(0.01)
            draining = asyncio.create_task(serving.drain())
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _stream(stub, "0")
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            left = await draining
            assert await in_flight == ["0", "1", "2", "3", "4", "stop"]
            assert (await unary).text == "done"
            await serving.server.stop(0)
            return refused.value, health.status, left

    refused, health, left = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.details() == "the test server is shutting down; retry the call"
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert 0 < left < 30


def test_calls_still_running_after_the_grace_period_are_ended():
    async def scenario():
        servicer = Slow()
        serving = await _serve(servicer)
        async with grpc.aio.insecure_channel(serving.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            in_flight = asyncio.create_task(_stream(stub, "100"))  # ten seconds a delta
            await servicer.started.wait()
            await serving.stop(grace=0.2)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await in_flight
            return ended.value.code()

    assert asyncio.run(scenario()) in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
