"""Micro-batching of CLIP forwards: images that arrive together share one batched forward.

Concurrent Analyze/Encode calls (and the items of one call) submit their images; the batcher
waits up to ``max_wait_ms`` for more, runs one forward over up to ``max_batch`` of them, and
hands each caller its own features. ``max_batch = 1`` turns batching off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from compressor_plugins.protocol import ImageFeatures
from vision_worker.metrics import VisionMetrics
from vision_worker.models import FeatureRequest


@dataclass(frozen=True)
class BatchingSettings:
    """How the vision worker batches CLIP forwards."""

    max_batch: int = field(default=8, metadata={"help": "most images in one CLIP forward; 1 turns batching off"})
    max_wait_ms: float = field(default=2.0, metadata={"help": "how long a forward waits for more images to join"})


@dataclass
class _Pending:
    image: Image.Image
    request: FeatureRequest
    future: asyncio.Future
    submitted: float


class MicroBatcher:
    """Gathers CLIP work from concurrent callers into batched forwards, one forward at a time."""

    def __init__(
        self,
        run: Callable[[list[Image.Image], list[FeatureRequest]], list[ImageFeatures]],
        lock: asyncio.Lock,
        settings: BatchingSettings,
        metrics: VisionMetrics,
    ) -> None:
        self._run = run
        self._lock = lock  # shared with compression: one piece of compute at a time
        self._settings = settings
        self._metrics = metrics
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None

    async def submit(self, image: Image.Image, request: FeatureRequest) -> ImageFeatures:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(image, request, future, time.perf_counter()))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            if len(self._pending) < self._settings.max_batch and self._settings.max_wait_ms > 0:
                await asyncio.sleep(self._settings.max_wait_ms / 1000.0)  # let more images join
            batch = [p for p in self._pending[: self._settings.max_batch] if not p.future.done()]
            del self._pending[: self._settings.max_batch]
            if not batch:
                continue
            async with self._lock:
                started = time.perf_counter()
                for pending in batch:
                    self._metrics.queue.observe(started - pending.submitted)
                job = asyncio.ensure_future(
                    asyncio.to_thread(self._run, [p.image for p in batch], [p.request for p in batch])
                )
                try:
                    # Shielded: a cancelled caller must not release the lock while the thread runs.
                    results = await asyncio.shield(job)
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(exc)
                    continue
                finally:
                    with contextlib.suppress(Exception):
                        await job
                    self._metrics.compute.labels(stage="clip").observe(time.perf_counter() - started)
            self._metrics.batch_size.observe(len(batch))
            for pending, features in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(features)
