"""The vision worker's throughput with and without micro-batching: workers of the bench's own,
called by concurrent clients."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench.media import Images
from bench.probes import scrape
from bench.progress import Progress
from bench.results import ThroughputPoint
from bench.settings import BenchSettings


class VisionWorkerProcess:
    """A vision worker of the bench's own (the stack's launch line), with its own batching."""

    def __init__(self, pack_root: Path, device: str, max_batch: int, folder: Path) -> None:
        from squint.app.stack import GrpcProcess

        folder.mkdir(parents=True, exist_ok=True)
        name = f"vision_max_batch_{max_batch}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SQUINT_VISION_BATCHING_MAX_BATCH": str(max_batch)}
        self.max_batch = max_batch
        self.metrics_port_file = folder / f"{name}.metrics.port"
        self.process = GrpcProcess(
            f"vision worker (max_batch {max_batch})",
            [
                sys.executable,
                "-m",
                "squint",
                "serve",
                "vision",
                "--pack",
                str(pack_root),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--device",
                device,
                "--redis-url",
                "",
                "--port-file",
                str(folder / f"{name}.port"),
                "--metrics-port",
                "0",
                "--metrics-port-file",
                str(self.metrics_port_file),
            ],
            env,
            folder / f"{name}.log",
            folder / f"{name}.port",
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.process.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port_file.read_text().strip()}/metrics"

    def start(self) -> None:
        self.process.start()

    def wait_ready(self, timeout: float) -> None:
        self.process.wait_ready("127.0.0.1", timeout)

    def stop(self) -> None:
        self.process.stop()


async def _analyze_all(address: str, batches: Sequence[Sequence[bytes]], timeout_s: float) -> float:
    """Every client sends its images one Analyze call after another; the wall time of all."""
    from squint.rpc import channel_options
    from squint.vision.v1 import vision_worker_pb2 as pb
    from squint.vision.v1 import vision_worker_pb2_grpc as pb_grpc
    from squint.wire import compressor_spec

    async with grpc.aio.insecure_channel(address, options=channel_options(256 * 1024 * 1024)) as channel:
        stub = pb_grpc.VisionWorkerStub(channel)
        spec = compressor_spec("none")

        async def client(images: Sequence[bytes]) -> None:
            for data in images:
                await stub.Analyze(
                    pb.AnalyzeRequest(images=[pb.ImageInput(data=data)], compressor=spec), timeout=timeout_s
                )

        started = time.perf_counter()
        await asyncio.gather(*(client(images) for images in batches))
        return time.perf_counter() - started


@dataclass
class ThroughputRuns:
    """Passes of Analyze calls against one worker at one client count, and its batching counters."""

    worker: VisionWorkerProcess
    clients: int
    images: int = 0
    times: list[float] = field(default_factory=list)
    forwards: float = 0.0
    batched: float = 0.0

    def run_pass(self, settings: BenchSettings, images: Images) -> None:
        """Every client sends ``requests_per_client`` fresh images, one Analyze call after another."""
        batches = [[images.fresh(seed=c) for _ in range(settings.requests_per_client)] for c in range(self.clients)]
        before = scrape(self.worker.metrics_url)
        self.times.append(asyncio.run(_analyze_all(self.worker.address, batches, settings.request_timeout_s)))
        after = scrape(self.worker.metrics_url)
        self.images = self.clients * settings.requests_per_client
        self.forwards += after.get("squint_vision_batch_size_count", 0) - before.get(
            "squint_vision_batch_size_count", 0
        )
        self.batched += after.get("squint_vision_batch_size_sum", 0) - before.get("squint_vision_batch_size_sum", 0)

    def point(self) -> ThroughputPoint:
        return ThroughputPoint(
            clients=self.clients,
            max_batch=self.worker.max_batch,
            images=self.images,
            seconds=float(np.median(self.times)),
            repeats=len(self.times),
            mean_batch=self.batched / self.forwards if self.forwards else 0.0,
        )


def measure_throughput(
    pack_root: Path, settings: BenchSettings, images: Images, folder: Path, progress: Progress
) -> list[ThroughputPoint]:
    """Two vision workers, identical but for their largest batch (1 and ``batched_max_batch``),
    called by each client count of ``settings.clients``, every point once per round."""
    workers = [VisionWorkerProcess(pack_root, settings.device, n, folder) for n in (1, settings.batched_max_batch)]
    progress.show(f"starting two vision workers (max_batch 1 and {settings.batched_max_batch})")
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(300)
        for worker in workers:  # connections and first calls, untimed
            asyncio.run(_analyze_all(worker.address, [[images.fresh()]], settings.request_timeout_s))
        progress.step("vision throughput")
        passes = [ThroughputRuns(worker, clients) for clients in settings.clients for worker in workers]
        for number in range(1, settings.throughput_repeats + 1):
            for one in passes:  # round-robin, so background load drifts over every point alike
                label = (
                    f"vision throughput {number}/{settings.throughput_repeats}: "
                    f"{one.clients} clients, max_batch {one.worker.max_batch}"
                )
                progress.show(label)
                one.run_pass(settings, images)
                progress.step(label)
        return [one.point() for one in passes]
    finally:
        for worker in workers:
            worker.stop()
