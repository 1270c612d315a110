"""Timed requests against a running stack: the compressor cases round-robin, then several
images and a video under one budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from bench.kv import KVShape, in_llm_pooling, kv_bytes
from bench.media import Images
from bench.probes import GaugeProbe, PeakMemory, with_peak
from bench.progress import Progress
from bench.results import Row, Sample, aggregate
from bench.settings import BenchSettings, Case


def _usage_sample(
    usage: Any, ttft_s: float, e2e_s: float, kv: KVShape, pooled: Sequence[tuple[int, int]], gauge: float
) -> Sample:
    media = list(usage.media)
    return Sample(
        ttft_s=ttft_s,
        e2e_s=e2e_s,
        completion_tokens=usage.completion_tokens,
        prompt_tokens=usage.prompt_tokens,
        visual_tokens=usage.visual_tokens,
        tokens_before=sum(m.tokens_before for m in media),
        kv_bytes=kv_bytes(kv, usage.prompt_tokens, usage.completion_tokens, pooled),
        kv_gauge_bytes=int(gauge),
        encode_ms=usage.timings.encode_ms,
        worker_encode_ms=sum(m.encode_ms for m in media),
        cache_hits=sum(1 for m in media if m.cache_hit),
        items=len(media),
        kept=sum(1 for m in media if not m.HasField("duplicate_of")),
    )


class StackClient:
    """Times streamed Generate calls against a running stack."""

    def __init__(self, address: str, kv: KVShape, triton_metrics_url: str | None, timeout_s: float) -> None:
        from squint.generate.v1 import generate_pb2_grpc
        from squint.rpc import channel_options

        self._channel = grpc.insecure_channel(address, options=channel_options(256 * 1024 * 1024))
        self._stub = generate_pb2_grpc.GenerationServiceStub(self._channel)
        self.kv = kv
        self.probe = GaugeProbe(triton_metrics_url, "squint_llm_kv_cache_bytes")
        self.timeout_s = timeout_s

    def run(self, request: Any, pooled: Sequence[tuple[int, int]] = ()) -> Sample:
        with self.probe:
            started = time.perf_counter()
            first: float | None = None
            usage = None
            for message in self._stub.GenerateStream(request, timeout=self.timeout_s):
                if message.token_ids and first is None:
                    first = time.perf_counter()
                if message.HasField("usage"):
                    usage = message.usage
            finished = time.perf_counter()
        if usage is None:
            raise RuntimeError("the stream ended without usage; is the orchestrator healthy?")
        return _usage_sample(usage, (first or finished) - started, finished - started, self.kv, pooled, self.probe.peak)

    def close(self) -> None:
        self._channel.close()


def image_request(
    question: str, images: Sequence[bytes], case: Case | None, max_new_tokens: int, budget: int = 0
) -> Any:
    from squint.app.client import build_request

    return build_request(
        question,
        images,
        compressor=case.compressor if case else "",
        params=dict(case.params) if case else None,
        budget=budget,
        max_new_tokens=max_new_tokens,
    )


def video_request(question: str, video: bytes, frames: int, compressor: str, max_new_tokens: int, budget: int) -> Any:
    from squint.generate.v1 import generate_pb2 as pb
    from squint.wire import compressor_spec

    return pb.GenerateRequest(
        chunks=[pb.Chunk(video=pb.Video(data=video, max_frames=frames)), pb.Chunk(text=question)],
        visual_token_budget=budget,
        compressor=compressor_spec(compressor),
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens),
    )


class CaseRuns:
    """The compressor cases, measured round-robin: each round sends one request per case, so a
    burst of load from elsewhere lands on one repeat of several cases, not on every repeat of
    one. A case whose request fails is reported and left out of later rounds."""

    def __init__(
        self,
        settings: BenchSettings,
        client: StackClient,
        memory: PeakMemory,
        images: Images,
        grid_tokens: int,
        progress: Progress,
        failures: list[str],
    ) -> None:
        self.settings, self.client, self.memory, self.images = settings, client, memory, images
        self.progress, self.failures = progress, failures
        self.cases = list(settings.cases)
        self.pooled = {case.name: in_llm_pooling(case, grid_tokens) for case in self.cases}
        self.cold: dict[str, list[Sample]] = {case.name: [] for case in self.cases}
        self.warm: dict[str, list[Sample]] = {case.name: [] for case in self.cases}
        self.last: dict[str, bytes] = {}

    def _each(self, label: str, request_for: Callable[[Case], Any], into: dict[str, list[Sample]] | None) -> None:
        for case in list(self.cases):
            self.progress.show(f"{case.name}: {label}")
            request = request_for(case)
            try:
                sample = with_peak(self.memory, lambda: self.client.run(request, self.pooled[case.name]))
            except grpc.RpcError as exc:
                self.failures.append(f"{case.name}: {exc.code().name}: {exc.details()}")
                self.progress.note(f"{case.name} failed ({self.failures[-1]}); going on without it")
                self.cases.remove(case)
                continue
            finally:
                self.progress.step(f"{case.name}: {label}")
            if into is not None:
                into[case.name].append(sample)

    def _request(self, case: Case, image: bytes, max_new_tokens: int) -> Any:
        return image_request(self.settings.question, [image], case, max_new_tokens)

    def warm_up(self) -> None:
        """One untimed request per case: first-call costs are not the compressor's."""
        self._each("warm-up", lambda case: self._request(case, self.images.fresh(), 1), None)

    def cold_round(self, number: int) -> None:
        def fresh(case: Case) -> Any:
            self.last[case.name] = self.images.fresh()
            return self._request(case, self.last[case.name], self.settings.max_new_tokens)

        self._each(f"cold {number}/{self.settings.repeats}", fresh, self.cold)

    def warm_round(self, number: int) -> None:
        self._each(
            f"warm {number}/{self.settings.warm_repeats}",
            lambda case: self._request(case, self.last[case.name], self.settings.max_new_tokens),
            self.warm,
        )

    def rows(self) -> list[Row]:
        """A cold row and (when measured) a warm row per case that did not fail."""
        out = []
        for case in self.cases:
            cold = aggregate(case.name, case.compressor, "cold", self.cold[case.name])
            out.append(cold)
            if self.warm[case.name]:
                out.append(aggregate(case.name, case.compressor, "warm", self.warm[case.name], cold=cold))
        return out


def media_runs(
    settings: BenchSettings,
    client: StackClient,
    memory: PeakMemory,
    images: Images,
    progress: Progress,
    failures: list[str],
) -> list[Row]:
    """``media_images`` images in one request, and a ``video_frames``-frame video, each under a
    ``media_budget`` visual-token budget, ``media_repeats`` times on fresh media: a row each."""
    media_case = Case(settings.media_compressor, settings.media_compressor)
    media: list[tuple[str, Callable[[], Any]]] = []
    if settings.media_images:
        media.append(
            (
                f"{settings.media_images} images",
                lambda: image_request(
                    settings.question,
                    [images.fresh(seed=i) for i in range(settings.media_images)],
                    media_case,
                    settings.max_new_tokens,
                    settings.media_budget,
                ),
            )
        )
    if settings.video_frames:
        media.append(
            (
                f"{settings.video_frames}-frame video",
                lambda: video_request(
                    settings.question,
                    images.video(settings.video_frames),
                    settings.video_frames,
                    settings.media_compressor,
                    settings.max_new_tokens,
                    settings.media_budget,
                ),
            )
        )
    rows = []
    for name, build in media:
        samples = []
        for r in range(settings.media_repeats):
            progress.show(f"{name} {r + 1}/{settings.media_repeats}")
            request = build()
            try:
                samples.append(with_peak(memory, lambda: client.run(request)))
            except grpc.RpcError as exc:
                failures.append(f"{name}: {exc.code().name}: {exc.details()}")
                progress.note(f"{name} failed ({failures[-1]})")
            progress.step(f"{name} {r + 1}/{settings.media_repeats}")
        if samples:
            rows.append(
                aggregate(
                    f"{name} ({settings.media_compressor})",
                    settings.media_compressor,
                    "cold",
                    samples,
                    budget=settings.media_budget,
                )
            )
    return rows
