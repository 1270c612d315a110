"""The orchestrator's Prometheus metrics: what one finished request and one Triton call record."""

from __future__ import annotations

import numpy as np
import pytest

from llm_worker.text_tensors import stop_tensor
from orchestrator.llm_client import _input, wire_bytes
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.types import MediaUsage, Timings, Usage


def media(tokens_before: int, tokens_after: int, compressor: str = "avgpool", **extra) -> MediaUsage:
    return MediaUsage(
        chunk_index=0,
        kind="image",
        tokens_before=tokens_before,
        tokens_after=tokens_after,
        compressor=compressor,
        cache_hit=False,
        cache_key="k",
        encode_ms=1.0,
        worker="w:1",
        allocated_tokens=tokens_after,
        **extra,
    )


def usage(*items: MediaUsage, total_ms: float = 1500.0) -> Usage:
    return Usage(
        prompt_tokens=200,
        completion_tokens=4,
        visual_tokens=sum(m.tokens_after for m in items),
        visual_token_budget=0,
        media=items,
        timings=Timings(encode_ms=300.0, time_to_first_token_ms=700.0, total_ms=total_ms),
        allocation_policy="uniform",
    )


def sample(metrics: OrchestratorMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_request_records_its_latency_and_compression_ratio():
    metrics = OrchestratorMetrics()
    metrics.record("length", usage(media(576, 144), media(576, 64, compressor="dfmr"), total_ms=1500.0))
    assert sample(metrics, "squint_request_seconds_count") == 1
    assert sample(metrics, "squint_request_seconds_sum") == pytest.approx(1.5)
    assert sample(metrics, "squint_request_seconds_bucket", le="1.0") == 0
    assert sample(metrics, "squint_request_seconds_bucket", le="2.5") == 1
    assert sample(metrics, "squint_compression_ratio_sum", compressor="avgpool") == pytest.approx(0.25)
    assert sample(metrics, "squint_compression_ratio_sum", compressor="dfmr") == pytest.approx(64 / 576)
    assert sample(metrics, "squint_compression_ratio_bucket", compressor="dfmr", le="0.1") == 0
    assert sample(metrics, "squint_compression_ratio_bucket", compressor="dfmr", le="0.15") == 1
    assert sample(metrics, "squint_visual_tokens_total", stage="before") == 1152
    assert sample(metrics, "squint_visual_tokens_total", stage="after") == 208


def test_dropped_frames_have_no_compression_ratio():
    metrics = OrchestratorMetrics()
    dropped = MediaUsage(
        chunk_index=0,
        kind="video_frame",
        tokens_before=576,
        tokens_after=0,
        compressor="",
        cache_hit=False,
        cache_key="",
        encode_ms=0.0,
        worker="",
        duplicate_of=0,
    )
    metrics.record("stop", usage(media(576, 36), dropped))
    assert sample(metrics, "squint_compression_ratio_count", compressor="avgpool") == 1
    assert sample(metrics, "squint_compression_ratio_count", compressor="-") == 0
    assert (
        sample(
            metrics,
            "squint_media_items_total",
            kind="video_frame",
            compressor="-",
            policy="uniform",
            outcome="duplicate",
        )
        == 1
    )


def test_bytes_sent_to_triton_by_input():
    visual = _input("visual_embeds", np.zeros((144, 64), np.float32), "FP32")
    ids = _input("input_ids", np.arange(200, dtype=np.int64), "INT64")
    stop = _input("stop", stop_tensor(["ab", "cde"]), "UINT8")
    assert wire_bytes(visual) == 144 * 64 * 4
    assert wire_bytes(ids) == 200 * 8
    assert wire_bytes(stop) == len('["ab", "cde"]')  # the strings as a UTF-8 JSON array

    metrics = OrchestratorMetrics()
    for _ in range(2):
        metrics.record_triton_request({t.name(): wire_bytes(t) for t in (visual, ids, stop)})
    assert sample(metrics, "squint_triton_requests_total") == 2
    assert sample(metrics, "squint_triton_sent_bytes_total", input="visual_embeds") == 2 * 144 * 64 * 4
    assert sample(metrics, "squint_triton_sent_bytes_total", input="input_ids") == 2 * 1600
    assert sample(metrics, "squint_triton_sent_bytes_total", input="stop") == 2 * 13
