"""Every Squint service answers /metrics, and the counts move with traffic."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from squint.app.client import build_request

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


def test_vision_worker_metrics_move(default_stack, default_client, png, unseen_seed):
    [url] = default_stack.vision_metrics_urls
    before = scrape(url)
    image = png(unseen_seed)
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


def test_orchestrator_metrics_move(default_stack, default_client, png, tiny_pack, unseen_seed):
    """Every documented orchestrator metric (docs/metrics.md) moves by what one request cost."""
    url = default_stack.orchestrator_metrics_url
    hidden = json.loads((tiny_pack.llava_dir / "config.json").read_text())["text_config"]["hidden_size"]
    image = png(unseen_seed)
    request = build_request("What?", [image], compressor="avgpool", max_new_tokens=2)

    before = scrape(url)
    reply = default_client.Generate(request, timeout=120)
    middle = scrape(url)
    default_client.Generate(request, timeout=120)  # the same image again: served from the cache
    after = scrape(url)

    def moved(name, start=before, end=middle, **labels):
        return value(end, name, **labels) - value(start, name, **labels)

    usage = reply.usage
    assert usage.visual_tokens == 144
    assert moved("squint_requests_total", finish_reason=reply.finish_reason) == 1
    for histogram in ("squint_request_seconds", "squint_time_to_first_token_seconds", "squint_encode_seconds"):
        assert moved(f"{histogram}_count") == 1, histogram
    assert moved("squint_request_seconds_sum") >= moved("squint_time_to_first_token_seconds_sum") > 0
    assert moved("squint_visual_tokens_total", stage="before") == 576
    assert moved("squint_visual_tokens_total", stage="allocated") == 144  # no budget: its natural count
    assert moved("squint_visual_tokens_total", stage="after") == 144
    assert moved("squint_compression_ratio_count", compressor="avgpool") == 1
    assert moved("squint_compression_ratio_sum", compressor="avgpool") == pytest.approx(0.25)
    assert moved("squint_compression_ratio_bucket", compressor="avgpool", le="0.2") == 0
    assert moved("squint_compression_ratio_bucket", compressor="avgpool", le="0.25") == 1
    media = dict(kind="image", compressor="avgpool", policy="uniform")
    assert moved("squint_media_items_total", outcome="computed", **media) == 1
    assert moved("squint_media_items_total", start=middle, end=after, outcome="cache_hit", **media) == 1
    # Bytes to Triton: the visual tokens as float32 rows of the LLM's width, the prompt as int64.
    assert moved("squint_triton_requests_total") == 1
    assert moved("squint_triton_sent_bytes_total", input="visual_embeds") == 144 * hidden * 4
    assert moved("squint_triton_sent_bytes_total", input="input_ids") == usage.prompt_tokens * 8
    assert moved("squint_triton_sent_bytes_total", input="max_new_tokens") == 4
    assert moved("squint_triton_sent_bytes_total", start=middle, end=after, input="visual_embeds") == 144 * hidden * 4
    # The one LLM worker (the stack's tritonserver): one request answered there, none in flight after.
    endpoint = default_stack.triton.grpc_url
    assert moved("squint_llm_worker_requests_total", endpoint=endpoint, outcome="ok") == 1
    assert moved("squint_llm_worker_failovers_total", endpoint=endpoint) == 0
    assert value(middle, "squint_llm_worker_requests_in_flight", endpoint=endpoint) == 0
    assert value(middle, "squint_llm_worker_up", endpoint=endpoint) == 1


def test_llm_worker_metrics_move(default_stack, default_client, png):
    """Triton's metrics endpoint carries the LLM worker's own counters and Triton's per-model ones."""
    url = default_stack.triton.metrics_url
    model = dict(model="squint_llm", version="1")
    before = _vllm_settled(url)
    reply = default_client.Generate(
        build_request("What?", [png(7)], compressor="avgpool", max_new_tokens=3), timeout=120
    )
    after = scrape(url)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("squint_llm_prompt_tokens_total", **model) == reply.usage.prompt_tokens
    assert moved("squint_llm_visual_tokens_total", **model) == reply.usage.visual_tokens == 144
    assert moved("squint_llm_generated_tokens_total", **model) == reply.usage.completion_tokens
    # Triton's own per-model counters (the parser names counter samples *_total). Triton counts a
    # decoupled request when the model releases it, which may come just after its last response.
    deadline = time.monotonic() + 10
    while moved("nv_inference_request_success_total", **model) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        after = scrape(url)
    assert moved("nv_inference_request_success_total", **model) == 1
    assert moved("nv_inference_count_total", **model) == 1
    for gauge in ("squint_llm_kv_cache_bytes", "squint_llm_active_sequences", "squint_llm_queued_requests"):
        assert (gauge, tuple(sorted(model.items()))) in after, gauge
    assert value(after, "squint_llm_active_sequences", **model) == 0  # the request is over
    # vLLM's own engine metrics, on the same endpoint: sent on once a second.
    engine = dict(model, engine="0")
    while moved("vllm:e2e_request_latency_seconds_count", **engine) < 1 and time.monotonic() < deadline + 10:
        time.sleep(0.2)
        after = scrape(url)
    assert moved("vllm:request_success_total", finished_reason=reply.finish_reason, **engine) == 1
    assert moved("vllm:e2e_request_latency_seconds_count", **engine) == 1
    assert moved("vllm:time_to_first_token_seconds_count", **engine) == 1
    assert moved("vllm:prompt_tokens_total", **engine) == reply.usage.prompt_tokens
    assert moved("vllm:generation_tokens_total", **engine) == reply.usage.completion_tokens
    assert moved("vllm:request_generation_tokens_sum", **engine) == reply.usage.completion_tokens
    assert value(after, "vllm:num_requests_running", **engine) == 0
    assert ("vllm:kv_cache_usage_perc", tuple(sorted(engine.items()))) in after


def _vllm_settled(url: str) -> dict[tuple[str, tuple], float]:
    """A scrape once vLLM's metrics have caught up with earlier requests (they are sent on once a
    second): two scrapes 1.2 s apart that agree on its token counts."""
    deadline = time.monotonic() + 15
    samples = scrape(url)
    while time.monotonic() < deadline:
        time.sleep(1.2)
        later = scrape(url)
        counts = [k for k in later if k[0] in ("vllm:generation_tokens_total", "vllm:prompt_tokens_total")]
        if counts and all(samples.get(k) == later[k] for k in counts):
            return later
        samples = later
    raise AssertionError("vLLM's token counts on Triton's metrics endpoint did not settle within 15 s")
