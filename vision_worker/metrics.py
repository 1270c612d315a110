"""The vision worker's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class VisionMetrics:
    """What the vision worker counts: calls, items, cache outcomes, tokens, time waiting for compute."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.calls = Counter(
            "squint_vision_calls_total", "Analyze and Encode calls, by method", ["method"], registry=self.registry
        )
        self.latency = Histogram(
            "squint_vision_call_seconds",
            "Analyze and Encode call latency",
            ["method"],
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.items = Counter(
            "squint_vision_items_total",
            "Images handled, by method and compressor",
            ["method", "compressor"],
            registry=self.registry,
        )
        self.cache = Counter(
            "squint_vision_cache_total",
            "Cache lookups by level (features, tokens) and outcome (hit, miss)",
            ["level", "outcome"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "squint_vision_tokens_total",
            "Visual tokens encoded, before and after compression",
            ["stage"],
            registry=self.registry,
        )
        self.queue = Histogram(
            "squint_vision_queue_seconds",
            "Time an image waited for the encoder (one CLIP forward runs at a time)",
            buckets=_LATENCY,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "squint_vision_batch_size",
            "Images per CLIP forward (micro-batching)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )
        self.compute = Histogram(
            "squint_vision_compute_seconds",
            "Work by stage: CLIP per forward (a micro-batch of images), a compressor per image",
            ["stage"],
            buckets=_LATENCY,
            registry=self.registry,
        )
