"""The orchestrator's accounting as Prometheus metrics: what each request's media cost."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.types import Usage


class OrchestratorMetrics:
    """Counters and histograms the orchestrator updates once per finished request."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "squint_requests_total",
            "Generate requests finished, by finish reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "squint_http_requests_total",
            "Requests to the OpenAI-compatible HTTP API, by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.media = Counter(
            "squint_media_items_total",
            "Images and video frames, by kind, compressor, allocation policy and outcome",
            ["kind", "compressor", "policy", "outcome"],
            registry=self.registry,
        )
        self.visual_tokens = Counter(
            "squint_visual_tokens_total",
            "Visual tokens: before compression, allocated by the budget, and spliced into prompts",
            ["stage"],
            registry=self.registry,
        )
        self.worker_items = Counter(
            "squint_vision_worker_items_total",
            "Images and frames served, by vision worker",
            ["worker"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "squint_time_to_first_token_seconds",
            "From receipt to the first generated token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.encode = Histogram(
            "squint_encode_seconds",
            "From receipt until every visual token was in hand",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.latency = Histogram(
            "squint_request_seconds",
            "From receipt to the last token of a finished request",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.compression = Histogram(
            "squint_compression_ratio",
            "Per image or frame: visual tokens after compression over tokens before, by compressor",
            ["compressor"],
            buckets=(0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0),
            registry=self.registry,
        )
        self.clip_forwards_saved = Counter(
            "squint_clip_forwards_saved_total",
            "Video frames skipped before CLIP because their pixels repeated an earlier frame's",
            registry=self.registry,
        )
        self.triton_requests = Counter(
            "squint_triton_requests_total",
            "Inference requests sent to the LLM worker on Triton",
            registry=self.registry,
        )
        self.triton_bytes = Counter(
            "squint_triton_sent_bytes_total",
            "Bytes of tensor content sent to Triton (KServe raw input contents), by input tensor",
            ["input"],
            registry=self.registry,
        )

        self.llm_in_flight = Gauge(
            "squint_llm_worker_requests_in_flight",
            "Requests streaming from each LLM worker (Triton endpoint) now: what the pool balances",
            ["endpoint"],
            registry=self.registry,
        )
        self.llm_requests = Counter(
            "squint_llm_worker_requests_total",
            "Requests sent to each LLM worker (Triton endpoint), by how they ended there",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.llm_failovers = Counter(
            "squint_llm_worker_failovers_total",
            "Requests moved off an LLM worker that failed UNAVAILABLE before their first token",
            ["endpoint"],
            registry=self.registry,
        )
        self.llm_up = Gauge(
            "squint_llm_worker_up",
            "1 while an LLM worker is tried first, 0 while it is backed off after a failure",
            ["endpoint"],
            registry=self.registry,
        )

    def forget_llm_worker(self, endpoint: str) -> None:
        """Drop the gauges of an LLM worker discovery no longer lists (its counters stay)."""
        for gauge in (self.llm_in_flight, self.llm_up):
            try:
                gauge.remove(endpoint)
            except KeyError:
                pass

    def record_triton_request(self, sizes: Mapping[str, int]) -> None:
        """One inference request to Triton: the bytes of each input tensor it carried."""
        self.triton_requests.inc()
        for name, size in sizes.items():
            self.triton_bytes.labels(input=name).inc(size)

    def record(self, finish_reason: str, usage: Usage) -> None:
        self.requests.labels(finish_reason=finish_reason or "none").inc()
        self.clip_forwards_saved.inc(usage.frames.sampled - usage.frames.analysed)
        for m in usage.media:
            if m.duplicate_of is not None:
                outcome = "duplicate"
            elif m.cache_hit:
                outcome = "cache_hit"
            else:
                outcome = "computed"
            self.media.labels(
                kind=m.kind, compressor=m.compressor or "-", policy=usage.allocation_policy or "-", outcome=outcome
            ).inc()
            self.visual_tokens.labels(stage="before").inc(m.tokens_before)
            self.visual_tokens.labels(stage="allocated").inc(m.allocated_tokens)
            self.visual_tokens.labels(stage="after").inc(m.tokens_after)
            if m.duplicate_of is None:
                self.worker_items.labels(worker=m.worker).inc()
                if m.tokens_before:
                    self.compression.labels(compressor=m.compressor or "-").observe(m.tokens_after / m.tokens_before)
        self.ttft.observe(usage.timings.time_to_first_token_ms / 1000.0)
        self.encode.observe(usage.timings.encode_ms / 1000.0)
        self.latency.observe(usage.timings.total_ms / 1000.0)
