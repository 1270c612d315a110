"""Every Squint service answers /metrics, and the counts move with traffic."""

from __future__ import annotations

import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from squint.client import build_request

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_vision_worker_metrics_move(default_stack, default_client, png):
    [url] = default_stack.vision_metrics_urls
    before = scrape(url)
    image = png(uuid.uuid4().int % 1_000_000)
    default_client.Generate(build_request("What?", [image], compressor="avgpool", max_new_tokens=2), timeout=120)
    default_client.Generate(build_request("What?", [image], compressor="avgpool", max_new_tokens=2), timeout=120)
    after = scrape(url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("squint_vision_calls_total", method="analyze") == 2
    assert moved("squint_vision_calls_total", method="encode") == 2
    assert moved("squint_vision_items_total", method="encode", compressor="avgpool") == 2
    assert moved("squint_vision_cache_total", level="features", outcome="miss") == 1  # CLIP ran once
    assert moved("squint_vision_cache_total", level="features", outcome="hit") >= 1
    assert moved("squint_vision_tokens_total", stage="before") == 2 * 576
    assert moved("squint_vision_tokens_total", stage="after") == 2 * 144
    assert moved("squint_vision_call_seconds_count", method="encode") == 2
    assert moved("squint_vision_queue_seconds_count") >= 1


def test_orchestrator_metrics_answer(default_stack, default_client, png):
    before = scrape(default_stack.orchestrator_metrics_url)
    default_client.Generate(build_request("What?", [png(5)], compressor="none", max_new_tokens=2), timeout=120)
    after = scrape(default_stack.orchestrator_metrics_url)
    key = ("squint_requests_total", (("finish_reason", "length"),))
    assert after.get(key, 0) - before.get(key, 0) == 1
    assert value(after, "squint_time_to_first_token_seconds_count") >= 1
