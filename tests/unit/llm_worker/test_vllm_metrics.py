"""vLLM's step statistics as metrics: vLLM's own stats objects in, recorded metric calls out."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from llm_worker.serving import COUNTER, GAUGE, HISTOGRAM
from llm_worker.vllm_metrics import EngineStatsRecorder, stat_logger_factory, token_buckets

stats = pytest.importorskip("vllm.v1.metrics.stats")
FinishReason = pytest.importorskip("vllm.v1.engine").FinishReason


class RecordedMetric:
    def __init__(self, spec, labels):
        self.spec, self.labels = spec, dict(labels)
        self.increments, self.sets, self.observations = [], [], []

    def increment(self, value):
        assert self.spec.kind == COUNTER
        self.increments.append(value)

    def set(self, value):
        assert self.spec.kind == GAUGE
        self.sets.append(value)

    def observe(self, value):
        assert self.spec.kind == HISTOGRAM
        self.observations.append(value)


class RecordingFactory:
    def __init__(self):
        self.made = []

    def __call__(self, spec, labels):
        self.made.append(RecordedMetric(spec, labels))
        return self.made[-1]

    def one(self, name, **labels):
        found = [m for m in self.made if m.spec.name == name and all(m.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (name, labels, found)
        return found[0]


def _step(running=1, waiting=0, usage=0.5, queries=0, hits=0, prompt=0, generated=1, preempted=0, ttft=(), finished=()):
    scheduler = stats.SchedulerStats(
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        kv_cache_usage=usage,
        prefix_cache_stats=stats.PrefixCacheStats(queries=queries, hits=hits),
    )
    iteration = stats.IterationStats()
    iteration.prompt_token_stats.total = prompt
    iteration.num_generation_tokens = generated
    iteration.num_preempted_reqs = preempted
    iteration.time_to_first_tokens_iter = list(ttft)
    iteration.finished_requests = list(finished)
    return scheduler, iteration


def _finished(reason, e2e, prompt_tokens, generated_tokens):
    return stats.FinishedRequestStats(
        finish_reason=reason,
        e2e_latency=e2e,
        num_prompt_tokens=prompt_tokens,
        num_generation_tokens=generated_tokens,
        queued_time=0.01,
        prefill_time=0.2,
        inference_time=e2e - 0.01,
        decode_time=e2e - 0.21,
        mean_time_per_output_token=0.05,
    )


@pytest.fixture
def recorder_and_metrics():
    factory = RecordingFactory()
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=300))
    recorder = stat_logger_factory(factory, {"model": "squint_llm", "version": "1"})(config, 0)
    yield recorder, factory
    recorder.close()


def test_steps_become_vllms_metrics_labelled_by_model_and_engine(recorder_and_metrics):
    recorder, metrics = recorder_and_metrics
    # Every metric but the per-reason counter is there before the first step, at zero.
    names = {m.spec.name for m in metrics.made}
    assert "vllm:generation_tokens_total" in names and "vllm:time_to_first_token_seconds" in names
    assert "vllm:request_success_total" not in names
    assert all(m.labels == {"model": "squint_llm", "version": "1", "engine": "0"} for m in metrics.made)

    # A request of 40 prompt tokens: prefilled with its first token, then 2 more, then it stops;
    # a second one runs out of tokens (length) in the last step.
    recorder.record(*_step(running=2, waiting=1, usage=0.25, queries=40, hits=16, prompt=40, ttft=[0.3]))
    recorder.record(*_step(running=2, usage=0.25))
    recorder.record(
        *_step(
            running=0,
            usage=0.0,
            generated=2,
            preempted=1,
            finished=[_finished(FinishReason.STOP, 1.5, 40, 3), _finished(FinishReason.LENGTH, 2.5, 7, 9)],
        )
    )
    recorder.send()

    assert sum(metrics.one("vllm:prompt_tokens_total").increments) == 40
    assert sum(metrics.one("vllm:generation_tokens_total").increments) == 4
    assert sum(metrics.one("vllm:prefix_cache_queries_total").increments) == 40
    assert sum(metrics.one("vllm:prefix_cache_hits_total").increments) == 16
    assert sum(metrics.one("vllm:num_preemptions_total").increments) == 1
    assert metrics.one("vllm:request_success_total", finished_reason="stop").increments == [1]
    assert metrics.one("vllm:request_success_total", finished_reason="length").increments == [1]
    assert metrics.one("vllm:time_to_first_token_seconds").observations == [0.3]
    assert metrics.one("vllm:e2e_request_latency_seconds").observations == [1.5, 2.5]
    assert metrics.one("vllm:request_prompt_tokens").observations == [40, 7]
    assert metrics.one("vllm:request_generation_tokens").observations == [3, 9]
    assert metrics.one("vllm:request_time_per_output_token_seconds").observations == [0.05, 0.05]
    assert metrics.one("vllm:request_queue_time_seconds").observations == [0.01, 0.01]
    # Gauges carry the last step's value.
    assert metrics.one("vllm:num_requests_running").sets[-1] == 0
    assert metrics.one("vllm:num_requests_waiting").sets[-1] == 0
    assert metrics.one("vllm:kv_cache_usage_perc").sets[-1] == 0.0
    # Token histograms: vLLM's 1-2-5 buckets up to the model's length.
    assert metrics.one("vllm:request_prompt_tokens").spec.buckets == (1, 2, 5, 10, 20, 50, 100, 200)


def test_only_changes_are_sent():
    metrics = RecordingFactory()
    recorder = EngineStatsRecorder(metrics, {"model": "m"}, 100, interval_seconds=3600)
    try:
        recorder.record(*_step(running=1, generated=1))
        recorder.send()
        recorder.record(*_step(running=1, generated=0))
        recorder.record(*_step(running=1, generated=0))
        recorder.send()
        recorder.send()  # nothing recorded since: nothing sent
        assert metrics.one("vllm:num_requests_running").sets == [1]
        assert metrics.one("vllm:generation_tokens_total").increments == [1]
        recorder.record(None, None)  # vLLM passes None where a step has no such stats
        recorder.record(*_step(running=3, generated=5))
        recorder.send()
        assert metrics.one("vllm:num_requests_running").sets == [1, 3]
        assert metrics.one("vllm:generation_tokens_total").increments == [1, 5]
    finally:
        recorder.close()


def test_the_thread_sends_without_being_asked():
    metrics = RecordingFactory()
    recorder = EngineStatsRecorder(metrics, {"model": "m"}, 100, interval_seconds=0.01)
    recorder.record(*_step(generated=7))
    recorder.close()  # joins the thread, which sends once more on its way out
    assert sum(metrics.one("vllm:generation_tokens_total").increments) == 7


def test_a_failing_metric_call_is_logged_and_the_thread_goes_on(caplog):
    def failing_for_reasons(spec, labels):
        if "finished_reason" in labels:  # made on the thread, when the first request finishes
            raise RuntimeError("triton is gone")
        return RecordedMetric(spec, labels)

    recorder = EngineStatsRecorder(failing_for_reasons, {"model": "m"}, 100, interval_seconds=0.01)
    recorder.record(*_step(finished=[_finished(FinishReason.ABORT, 1.0, 1, 1)]))
    deadline = time.monotonic() + 10
    while "could not send vLLM's metrics" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "could not send vLLM's metrics" in caplog.text
    assert recorder._thread.is_alive()
    recorder.close()


def test_token_buckets():
    assert token_buckets(4096) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    assert token_buckets(1) == (1,)
