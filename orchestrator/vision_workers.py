"""Routing the vision work of a request across vision-worker replicas.

Each image goes to the worker that owns its content hash on the consistent-hash ring (so a
repeated image meets its kept features), Encode follows Analyze to the same worker, and a worker
that fails with UNAVAILABLE is marked down while its items move to the next worker in their
ring order. A request fails only when every worker has failed it.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from orchestrator.discovery import Discovery
from orchestrator.routing import WorkerPool
from orchestrator.vision_client import (
    CompressorSummary,
    EncodedMedia,
    ImageToEncode,
    MediaAnalysis,
    VisionClient,
    VisionContext,
)
from squint.aio import gather_or_cancel
from squint.errors import UpstreamUnavailable
from squint.rpc import ClientTlsSettings

logger = logging.getLogger(__name__)

R = TypeVar("R")

# Items per call are bounded so neither a request nor its reply nears the gRPC message limit
# (an Encode reply carries every item's tokens: 576 x 4096 fp16 is 4.7 MB an image).
MAX_BATCH_BYTES = 32 * 1024 * 1024
MAX_BATCH_ITEMS = 16


def _batches(indices: list[int], items: Sequence[ImageToEncode]) -> list[list[int]]:
    batches: list[list[int]] = [[]]
    size = 0
    for i in indices:
        if batches[-1] and (size + len(items[i].data) > MAX_BATCH_BYTES or len(batches[-1]) >= MAX_BATCH_ITEMS):
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += len(items[i].data)
    return batches


class VisionWorkers:
    """The vision-worker replicas a discovery reports, with a client each."""

    def __init__(
        self,
        discovery: Discovery,
        max_message_bytes: int,
        timeout_seconds: float,
        down_seconds: float,
        tls: ClientTlsSettings = ClientTlsSettings(),
        *,
        connect: Callable[[str], VisionClient] | None = None,
    ) -> None:
        """``connect``: builds the client of one worker (``host:port``); by default a gRPC one."""
        self.discovery = discovery
        self.pool = WorkerPool()
        self._connect = connect or (lambda address: VisionClient(address, max_message_bytes, timeout_seconds, tls))
        self._down_seconds = down_seconds
        self._clients: dict[str, VisionClient] = {}
        self._calls_in_flight: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        """Begin discovery (its first answer fills the pool before this returns)."""
        self.discovery.start(self.pool.update)
        logger.info("vision workers: %s", ", ".join(sorted(self.pool.workers)) or "none yet")

    async def _prune(self) -> None:
        """Close the channels of workers discovery no longer reports (pods come and go), once no
        call runs on them: closing a channel cancels its calls, which would fail their requests."""
        workers = self.pool.workers
        for address in [a for a in self._clients if a not in workers and not self._calls_in_flight[a]]:
            await self._clients.pop(address).close()

    def client(self, address: str) -> VisionClient:
        if address not in self._clients:
            self._clients[address] = self._connect(address)
        return self._clients[address]

    async def _dispatch(
        self,
        items: Sequence[ImageToEncode],
        keys: Sequence[str],
        call: Callable[[VisionClient, list[ImageToEncode]], Awaitable[list[R]]],
        preferred: Sequence[str | None] | None = None,
    ) -> list[tuple[R, str]]:
        """Run ``call`` on every item, grouped by worker, failing over per item; results in order."""
        await self._prune()
        remaining = {
            i: ([preferred[i]] if preferred and preferred[i] else []) + self.pool.candidates(keys[i])
            for i in range(len(items))
        }
        for i, candidates in remaining.items():  # the preferred worker may be in the ring order too
            remaining[i] = list(dict.fromkeys(candidates))
        results: dict[int, tuple[R, str]] = {}
        tried: dict[int, list[str]] = {i: [] for i in remaining}
        while remaining:
            groups: dict[str, list[int]] = {}
            for i, candidates in remaining.items():
                if not candidates:
                    where = ", ".join(tried[i]) or "none are known"
                    raise UpstreamUnavailable(f"no vision worker could serve {items[i].label} (tried: {where})")
                groups.setdefault(candidates[0], []).append(i)

            async def run(address: str, indices: list[int]) -> tuple[str, list[int], list[R] | Exception]:
                self._calls_in_flight[address] += 1
                try:
                    return address, indices, await call(self.client(address), [items[i] for i in indices])
                except UpstreamUnavailable as exc:
                    return address, indices, exc
                finally:
                    self._calls_in_flight[address] -= 1

            calls = [(a, batch) for a, ix in groups.items() for batch in _batches(ix, items)]
            for address, indices, outcome in await gather_or_cancel(*(run(a, ix) for a, ix in calls)):
                if isinstance(outcome, Exception):
                    logger.warning("vision worker %s failed (%s); moving %d items on", address, outcome, len(indices))
                    self.pool.mark_down(address, self._down_seconds)
                    for i in indices:
                        tried[i].append(address)
                        remaining[i] = [a for a in remaining[i] if a != address]
                    continue
                self.pool.mark_up(address)
                for i, result in zip(indices, outcome, strict=True):
                    results[i] = (result, address)
                    del remaining[i]
        return [results[i] for i in range(len(items))]

    async def analyze(
        self, items: Sequence[ImageToEncode], keys: Sequence[str], context: VisionContext
    ) -> list[tuple[MediaAnalysis, str]]:
        return await self._dispatch(items, keys, lambda c, batch: c.analyze(batch, context))

    async def encode(
        self,
        items: Sequence[ImageToEncode],
        keys: Sequence[str],
        preferred: Sequence[str | None],
        context: VisionContext,
    ) -> list[tuple[EncodedMedia, str]]:
        return await self._dispatch(items, keys, lambda c, batch: c.encode(batch, context), preferred)

    async def list_compressors(self, context: VisionContext) -> list[CompressorSummary]:
        """The compressors of the first worker that answers (every replica runs the same pack)."""
        return await self._any("listed its compressors", lambda client: client.list_compressors(context))

    async def smallest(self, context: VisionContext) -> int:
        """The fewest tokens any image can be held to under the context's compressor setting
        (every replica runs the same pack); 0 when only an image can tell."""
        return await self._any("said how small an image can get", lambda client: client.smallest(context))

    async def _any(self, what: str, call: Callable[[VisionClient], Awaitable[R]]) -> R:
        """``call`` on the first worker that answers, in address order; a down worker is skipped."""
        await self._prune()
        tried = []
        for address in sorted(self.pool.workers):
            try:
                return await call(self.client(address))
            except UpstreamUnavailable:
                tried.append(address)
        where = ", ".join(tried) or "none are known"
        raise UpstreamUnavailable(f"no vision worker {what} (tried: {where})")

    async def close(self) -> None:
        self.discovery.stop()
        for client in self._clients.values():
            await client.close()
