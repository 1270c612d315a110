"""The LLM's throughput through the stack: 1, 4 and 16 concurrent streams on each engine.

Every stream sends ``stream_requests`` requests one after another (the next when the last has
finished), compressor ``stream_compressor``, each stream on its own image, which was asked about
once before the timing starts: its features and compressed tokens are cached, so the vision
worker only reads its cache and what the point measures is the orchestrator and the LLM engine
(a cold image per request would measure CLIP on this machine's two cores instead). Prompts
differ from stream to stream (their images do), and vLLM's prefix caching is off by default.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc

from bench.media import Images
from bench.progress import Progress
from bench.results import Sample, StreamPoint, stream_point
from bench.settings import BenchSettings, Case
from bench.stack_runs import StackClient, image_request


def stream_steps(settings: BenchSettings) -> int:
    """The progress bar's steps of :func:`measure_streams`."""
    if not settings.streams or not settings.stream_engines:
        return 0
    return 1 + len(settings.stream_engines) * len(settings.streams)


def _run_streams(
    client: StackClient, images: Sequence[bytes], settings: BenchSettings, case: Case, errors: list[str]
) -> tuple[list[Sample], float]:
    """One stream per image, all started together; the finished requests and the wall time."""
    samples: list[Sample] = []
    lock = threading.Lock()
    start = threading.Barrier(len(images) + 1)

    def one(image: bytes) -> None:
        start.wait()
        for _ in range(settings.stream_requests):
            request = image_request(settings.question, [image], case, settings.max_new_tokens)
            try:
                ttft_s, e2e_s, usage, first_tokens = client.stream(request)
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                return
            sample = Sample(
                ttft_s=ttft_s,
                e2e_s=e2e_s,
                completion_tokens=usage.completion_tokens,
                prompt_tokens=usage.prompt_tokens,
                visual_tokens=usage.visual_tokens,
                encode_ms=usage.timings.encode_ms,
                first_tokens=first_tokens,
            )
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=one, args=(image,), name=f"stream-{i}") for i, image in enumerate(images)]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return samples, time.perf_counter() - started


def measure_streams(
    clients: dict[str, StackClient],
    settings: BenchSettings,
    images: Images,
    progress: Progress,
    failures: list[str],
) -> list[StreamPoint]:
    """A point per engine of ``stream_engines`` and stream count of ``streams``, in that order.

    ``clients`` maps an engine to the orchestrator that sends requests without in-LLM pooling to it.
    A point with a failed request is reported in ``failures`` and left out.
    """
    if not stream_steps(settings):
        return []
    case = Case(settings.stream_compressor, settings.stream_compressor)
    pictures = [images.fresh(seed=i) for i in range(max(settings.streams))]
    progress.show(f"LLM throughput: caching {len(pictures)} images")
    for engine in settings.stream_engines:  # first-call costs, untimed; the images' tokens cached
        for picture in pictures if engine == settings.stream_engines[0] else pictures[:1]:
            clients[engine].stream(image_request(settings.question, [picture], case, 1))
    progress.step("LLM throughput: images cached")
    points = []
    for engine in settings.stream_engines:
        for count in settings.streams:
            label = f"LLM throughput: {engine}, {count} streams"
            progress.show(label)
            errors: list[str] = []
            samples, seconds = _run_streams(clients[engine], pictures[:count], settings, case, errors)
            progress.step(label)
            if errors:
                failures.append(f"{label}: {len(errors)} failed requests, the first {errors[0]}")
                progress.note(f"{label} failed ({failures[-1]})")
                continue
            points.append(stream_point(engine, count, settings.stream_compressor, samples, seconds))
    return points
