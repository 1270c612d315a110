"""The orchestrator's accounting as Prometheus metrics: what each request's media cost."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from orchestrator.types import Usage


class OrchestratorMetrics:
    """Counters and histograms the orchestrator updates once per finished request."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "squint_requests_total", "Generate requests finished, by finish reason", ["finish_reason"], registry=self.registry
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
            "squint_vision_worker_items_total", "Images and frames served, by vision worker", ["worker"], registry=self.registry
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

    def record(self, finish_reason: str, usage: Usage) -> None:
        self.requests.labels(finish_reason=finish_reason or "none").inc()
        for m in usage.media:
            if m.duplicate_of is not None:
                outcome = "duplicate"
            elif m.cache_hit:
                outcome = "cache_hit"
            else:
                outcome = "computed"
            self.media.labels(kind=m.kind, compressor=m.compressor or "-", policy=usage.allocation_policy or "-", outcome=outcome).inc()
            self.visual_tokens.labels(stage="before").inc(m.tokens_before)
            self.visual_tokens.labels(stage="allocated").inc(m.allocated_tokens)
            self.visual_tokens.labels(stage="after").inc(m.tokens_after)
            if m.duplicate_of is None:
                self.worker_items.labels(worker=m.worker).inc()
        self.ttft.observe(usage.timings.time_to_first_token_ms / 1000.0)
        self.encode.observe(usage.timings.encode_ms / 1000.0)
