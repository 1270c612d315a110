"""Timed requests against a running stack: the compressor cases round-robin, then several
images and a video under one budget.

Every request's engine is checked, not assumed: the LLM worker's two Triton models count their
generated tokens apart (``squint_llm_generated_tokens_total`` by its ``model`` label), and the
sample records the engine whose counter moved."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from bench.kv import KVShape, in_llm_pooling, kv_bytes
from bench.media import Images
from bench.probes import GaugeProbe, PeakMemory, sample_sum, with_peak
from bench.progress import Progress
from bench.results import Row, Sample, aggregate
from bench.settings import ENGINE_MODELS, VLLM, BenchSettings, Case

GENERATED = "squint_llm_generated_tokens_total"
KV_GAUGE = "squint_llm_kv_cache_bytes"


def new_question(number: int) -> str:
    """A question never asked before in a run (of the ``number``-th new-question round)."""
    return f"Question {number}: which colours and shapes does this picture show?"


def question_cases(cases: Sequence[Case]) -> list[Case]:
    """The cases asked a new question about a cached image: those whose tokens depend on it."""
    return [case for case in cases if case.compressor == "text_recovery"]


def _usage_sample(
    usage: Any, ttft_s: float, e2e_s: float, kv: KVShape, pooled: Sequence[tuple[int, int]], gauge: float, engine: str
) -> Sample:
    media = list(usage.media)
    return Sample(
        engine=engine,
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


def generated_by_engine(metrics_url: str | None) -> dict[str, float]:
    """Each engine's generated-token counter, from Triton's metrics page ({} without one)."""
    if not metrics_url:
        return {}
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return {engine: sample_sum(text, GENERATED, {"model": model}) for engine, model in ENGINE_MODELS.items()}


def engines_moved(before: dict[str, float], after: dict[str, float]) -> str:
    """The engines whose counter moved between two readings, joined by "+"; "" for none."""
    return "+".join(engine for engine in after if after[engine] > before.get(engine, 0.0))


class StackClient:
    """Times streamed Generate calls against one orchestrator of a running stack."""

    def __init__(self, address: str, kv: KVShape, triton_metrics_url: str | None, timeout_s: float) -> None:
        from squint.generate.v1 import generate_pb2_grpc
        from squint.rpc import channel_options

        self._channel = grpc.insecure_channel(address, options=channel_options(256 * 1024 * 1024))
        self._stub = generate_pb2_grpc.GenerationServiceStub(self._channel)
        self.kv = kv
        self.metrics_url = triton_metrics_url
        self.timeout_s = timeout_s

    def stream(self, request: Any) -> tuple[float, float, Any, int]:
        """One streamed request: (TTFT s, end to end s, its usage, tokens in the first message with any)."""
        started = time.perf_counter()
        first: float | None = None
        first_tokens = 1
        usage = None
        for message in self._stub.GenerateStream(request, timeout=self.timeout_s):
            if message.token_ids and first is None:
                first = time.perf_counter()
                first_tokens = len(message.token_ids)
            if message.HasField("usage"):
                usage = message.usage
        finished = time.perf_counter()
        if usage is None:
            raise RuntimeError("the stream ended without usage; is the orchestrator healthy?")
        return (first or finished) - started, finished - started, usage, first_tokens

    def run(self, request: Any, pooled: Sequence[tuple[int, int]] = (), engine: str = VLLM) -> Sample:
        """One request alone, with the KV gauge of ``engine``'s model polled while it runs and the
        engine that served it read from the generated-token counters around it."""
        probe = GaugeProbe(self.metrics_url, KV_GAUGE, labels={"model": ENGINE_MODELS[engine]})
        before = generated_by_engine(self.metrics_url)
        with probe:
            ttft_s, e2e_s, usage, first_tokens = self.stream(request)
        served = engines_moved(before, generated_by_engine(self.metrics_url))
        sample = _usage_sample(usage, ttft_s, e2e_s, self.kv, pooled, probe.peak, served)
        return dataclasses.replace(sample, first_tokens=first_tokens)

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


Key = tuple[str, str]  # (case name, engine)


def case_key(case: Case) -> Key:
    return case.name, case.engine


def case_label(case: Case) -> str:
    return f"{case.name} [{case.engine}]"


class CaseRuns:
    """The compressor cases, measured round-robin: each round sends one request per case, so a
    burst of load from elsewhere lands on one repeat of several cases, not on every repeat of
    one. A case whose request fails, or is served by another engine than its own, is reported
    and left out of later rounds.

    ``clients`` maps an engine to the orchestrator that sends a case of that engine with no
    in-LLM pooling there (``staged``: the bench's second orchestrator); a case that pools inside
    the LLM goes through the ``vllm`` one, whose routing sends its image spans to the staged engine.
    ``memory`` maps the same keys to the processes that serve through that orchestrator.
    """

    def __init__(
        self,
        settings: BenchSettings,
        clients: dict[str, StackClient],
        memory: dict[str, PeakMemory],
        images: Images,
        grid_tokens: int,
        progress: Progress,
        failures: list[str],
    ) -> None:
        self.settings, self.clients, self.memory, self.images = settings, clients, memory, images
        self.progress, self.failures = progress, failures
        self.cases = list(settings.cases)
        self.pooled = {case_key(case): in_llm_pooling(case, grid_tokens) for case in self.cases}
        self.cold: dict[Key, list[Sample]] = {case_key(case): [] for case in self.cases}
        self.warm: dict[Key, list[Sample]] = {case_key(case): [] for case in self.cases}
        self.question: dict[Key, list[Sample]] = {case_key(case): [] for case in self.cases}
        self.last: dict[Key, bytes] = {}

    def _route(self, case: Case) -> str:
        return VLLM if case.pools_in_llm else case.engine

    def client_for(self, case: Case) -> StackClient:
        return self.clients[self._route(case)]

    def _drop(self, case: Case, why: str) -> None:
        self.failures.append(f"{case_label(case)}: {why}")
        self.progress.note(f"{case_label(case)} failed ({why}); going on without it")
        self.cases.remove(case)

    def _each(
        self,
        label: str,
        request_for: Callable[[Case], Any],
        into: dict[Key, list[Sample]] | None,
        cases: Sequence[Case] | None = None,
    ) -> None:
        for case in [c for c in self.cases if cases is None or c in cases]:
            self.progress.show(f"{case_label(case)}: {label}")
            request = request_for(case)
            client = self.client_for(case)
            try:
                sample = with_peak(
                    self.memory[self._route(case)],
                    lambda: client.run(request, self.pooled[case_key(case)], case.engine),
                )
            except grpc.RpcError as exc:
                self._drop(case, f"{exc.code().name}: {exc.details()}")
                continue
            finally:
                self.progress.step(f"{case_label(case)}: {label}")
            if sample.engine and sample.engine != case.engine:
                self._drop(case, f"served by the {sample.engine} engine, not {case.engine}")
                continue
            if into is not None:
                into[case_key(case)].append(sample)

    def _request(self, case: Case, image: bytes, max_new_tokens: int, question: str | None = None) -> Any:
        return image_request(question or self.settings.question, [image], case, max_new_tokens)

    def warm_up(self) -> None:
        """One untimed request per case: first-call costs are not the compressor's."""
        self._each("warm-up", lambda case: self._request(case, self.images.fresh(), 1), None)

    def cold_round(self, number: int) -> None:
        def fresh(case: Case) -> Any:
            self.last[case_key(case)] = self.images.fresh()
            return self._request(case, self.last[case_key(case)], self.settings.max_new_tokens)

        self._each(f"cold {number}/{self.settings.repeats}", fresh, self.cold)

    def warm_round(self, number: int) -> None:
        self._each(
            f"warm {number}/{self.settings.warm_repeats}",
            lambda case: self._request(case, self.last[case_key(case)], self.settings.max_new_tokens),
            self.warm,
        )

    def question_round(self, number: int) -> None:
        """A question not asked before about each question-dependent case's last image (cached)."""
        self._each(
            f"new question {number}/{self.settings.warm_repeats}",
            lambda case: self._request(
                case, self.last[case_key(case)], self.settings.max_new_tokens, new_question(number)
            ),
            self.question,
            question_cases(self.cases),
        )

    def rows(self) -> list[Row]:
        """Per case that did not fail: a cold row, and a warm and a new-question row when measured."""
        out = []
        for case in self.cases:
            key = case_key(case)
            cold = aggregate(case.name, case.compressor, "cold", self.cold[key], engine=case.engine)
            out.append(cold)
            for cache, samples in (("warm", self.warm[key]), ("new q", self.question[key])):
                if samples:
                    out.append(aggregate(case.name, case.compressor, cache, samples, cold=cold, engine=case.engine))
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
                samples.append(with_peak(memory, lambda: client.run(request, engine=VLLM)))
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
                    engine=VLLM,
                )
            )
    return rows
