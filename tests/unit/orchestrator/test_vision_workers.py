"""The vision-worker replicas seen from the orchestrator: calls over several workers, and channels
of workers that discovery drops (fake clients; the routing itself is tests/unit/orchestrator/test_routing.py)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.discovery import StaticDiscovery
from orchestrator.vision_client import ImageToEncode, VisionContext
from orchestrator.vision_workers import VisionWorkers
from squint.errors import InvalidMedia

A, B = "10.0.0.1:50052", "10.0.0.2:50052"
CONTEXT = VisionContext("", {}, "", "request-1")


class FakeVisionClient:
    """Answers Analyze with each item's label, after ``gate`` (when set) opens; or raises ``error``."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.cancelled = False
        self.closed = False

    async def analyze(self, batch, context):
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if self.error is not None:
                raise self.error
            return [item.label for item in batch]
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def close(self) -> None:
        self.closed = True


def workers_of(clients: dict[str, FakeVisionClient]) -> VisionWorkers:
    workers = VisionWorkers(StaticDiscovery(list(clients)), 1 << 20, 10.0, 5.0, connect=lambda a: clients[a])
    workers.start()
    return workers


def images(n: int) -> tuple[list[ImageToEncode], list[str]]:
    return [ImageToEncode(b"png", f"chunks[{i}].image") for i in range(n)], [f"image-{i}" for i in range(n)]


def test_one_workers_error_cancels_the_calls_still_running_on_the_others():
    # A bad image on one worker fails the request: the other worker's part of it stops too.
    clients = {A: FakeVisionClient(InvalidMedia("chunks[0].image is not an image")), B: FakeVisionClient()}
    clients[B].gate = asyncio.Event()  # never opens
    workers = workers_of(clients)
    items, keys = images(8)

    async def scenario():
        with pytest.raises(InvalidMedia):
            await workers.analyze(items, keys, CONTEXT)
        return clients[B].started.is_set(), clients[B].cancelled

    started, cancelled = asyncio.run(scenario())
    assert started, "the eight images were all sent to one worker; the test needs both"
    assert cancelled


def test_a_worker_discovery_drops_keeps_its_channel_until_its_calls_end():
    # A rollout: the pod leaves discovery while a request runs on it; that request must finish.
    clients = {A: FakeVisionClient(), B: FakeVisionClient()}
    clients[A].gate = asyncio.Event()
    workers = VisionWorkers(StaticDiscovery([A]), 1 << 20, 10.0, 5.0, connect=lambda a: clients[a])
    workers.start()
    items, keys = images(1)

    async def scenario():
        first = asyncio.create_task(workers.analyze(items, keys, CONTEXT))
        await clients[A].started.wait()
        workers.pool.update([B])
        second = await workers.analyze(items, keys, CONTEXT)  # on B; prunes what discovery dropped
        closed_while_running = clients[A].closed
        clients[A].gate.set()
        answered = await first
        await workers.analyze(items, keys, CONTEXT)  # A is idle now: this prune closes it
        return closed_while_running, answered, second, clients[A].closed

    closed_while_running, answered, second, closed_after = asyncio.run(scenario())
    assert not closed_while_running
    assert answered == [("chunks[0].image", A)] and second == [("chunks[0].image", B)]
    assert closed_after
