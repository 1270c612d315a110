"""vLLM's engine metrics (``vllm:*``) on Triton's own metrics endpoint, beside ``squint_llm_*``.

vLLM hands each engine step's statistics to the stat loggers given to ``AsyncLLM``
(``stat_loggers=[factory]``; vLLM calls ``factory(vllm_config, engine_index)`` and then the
logger's ``record``, ``log`` and ``log_engine_initialized``). :class:`EngineStatsRecorder` is such
a logger. ``record`` only adds to plain counters, gauges and pending observations; a thread sends
them on once a second, so a decode step never waits on the metric calls (in Triton's Python stub
each one is a message to the server).

The names, kinds and meanings are those of vLLM's own Prometheus logger, so a dashboard built for
vLLM reads them. Two are left out on purpose: the per-token latency histogram (an observation per
generated token) — the per-request mean, ``vllm:request_time_per_output_token_seconds``, stands
in for it — and the configuration info gauges. The metric objects come from a factory the adapter
gives (Triton's ``pb_utils.MetricFamily`` there, a recording fake in the unit tests), which keeps
this module free of Triton.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from llm_worker.serving import COUNTER, GAUGE, HISTOGRAM, Metric, MetricFactory, MetricSpec

logger = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_REQUEST_SECONDS_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                            240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_PER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                      40.0, 80.0)  # fmt: skip


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (vLLM's buckets for token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return tuple(float(b) for b in buckets)
            buckets.append(mantissa * scale)
        scale *= 10


def metric_specs(max_model_len: int) -> dict[str, MetricSpec]:
    """What :class:`EngineStatsRecorder` reports, by key."""
    tokens = token_buckets(max_model_len)
    return {
        "running": MetricSpec("vllm:num_requests_running", "Requests in the engine's running batch", GAUGE),
        "waiting": MetricSpec("vllm:num_requests_waiting", "Requests waiting for the running batch", GAUGE),
        "kv_cache_usage": MetricSpec("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means full", GAUGE),
        "prefix_cache_queries": MetricSpec(
            "vllm:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache", COUNTER
        ),
        "prefix_cache_hits": MetricSpec(
            "vllm:prefix_cache_hits_total", "Prompt tokens found in the prefix cache", COUNTER
        ),
        "preemptions": MetricSpec("vllm:num_preemptions_total", "Requests preempted by the engine", COUNTER),
        "prompt_tokens": MetricSpec("vllm:prompt_tokens_total", "Prompt tokens prefilled", COUNTER),
        "generation_tokens": MetricSpec("vllm:generation_tokens_total", "Tokens generated", COUNTER),
        "success": MetricSpec(
            "vllm:request_success_total", "Requests finished, by finished_reason (stop, length, abort, ...)", COUNTER
        ),
        "time_to_first_token": MetricSpec(
            "vllm:time_to_first_token_seconds", "Time to the first token", HISTOGRAM, _TTFT_BUCKETS
        ),
        "e2e_latency": MetricSpec(
            "vllm:e2e_request_latency_seconds",
            "Request latency, arrival to finish",
            HISTOGRAM,
            _REQUEST_SECONDS_BUCKETS,
        ),
        "queued_time": MetricSpec(
            "vllm:request_queue_time_seconds", "Time requests waited to run", HISTOGRAM, _REQUEST_SECONDS_BUCKETS
        ),
        "prefill_time": MetricSpec(
            "vllm:request_prefill_time_seconds", "Time requests spent in prefill", HISTOGRAM, _REQUEST_SECONDS_BUCKETS
        ),
        "decode_time": MetricSpec(
            "vllm:request_decode_time_seconds", "Time requests spent in decode", HISTOGRAM, _REQUEST_SECONDS_BUCKETS
        ),
        "inference_time": MetricSpec(
            "vllm:request_inference_time_seconds", "Time requests spent running", HISTOGRAM, _REQUEST_SECONDS_BUCKETS
        ),
        "time_per_output_token": MetricSpec(
            "vllm:request_time_per_output_token_seconds",
            "Each request's mean time per generated token after the first",
            HISTOGRAM,
            _PER_TOKEN_BUCKETS,
        ),
        "request_prompt_tokens": MetricSpec(
            "vllm:request_prompt_tokens", "Prompt tokens of each finished request", HISTOGRAM, tokens
        ),
        "request_generation_tokens": MetricSpec(
            "vllm:request_generation_tokens", "Generated tokens of each finished request", HISTOGRAM, tokens
        ),
    }


# Each finished request's statistics (vLLM's FinishedRequestStats) by the histogram they go to.
_PER_REQUEST = {
    "e2e_latency": "e2e_latency",
    "queued_time": "queued_time",
    "prefill_time": "prefill_time",
    "decode_time": "decode_time",
    "inference_time": "inference_time",
    "time_per_output_token": "mean_time_per_output_token",
    "request_prompt_tokens": "num_prompt_tokens",
    "request_generation_tokens": "num_generation_tokens",
}


class EngineStatsRecorder:
    """One vLLM engine's step statistics as metrics from ``make_metric``; a vLLM stat logger."""

    def __init__(
        self,
        make_metric: MetricFactory,
        labels: Mapping[str, str],
        max_model_len: int,
        *,
        interval_seconds: float = 1.0,
    ) -> None:
        self._make_metric = make_metric
        self._labels = dict(labels)
        self._specs = metric_specs(max_model_len)
        self._metrics: dict[tuple[str, str], Metric] = {}
        self._lock = threading.Lock()
        self._counts: defaultdict[tuple[str, str], float] = defaultdict(float)  # (key, reason): not yet sent
        self._observations: defaultdict[str, list[float]] = defaultdict(list)
        self._gauges: dict[str, float] = {}
        self._sent_gauges: dict[str, float] = {}
        # Every metric but the per-reason ones is there from the start, at zero.
        for key in self._specs:
            if key != "success":
                self._metric(key)
        self._interval = interval_seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._send_periodically, name="squint-vllm-metrics", daemon=True)
        self._thread.start()

    # -- vLLM's stat-logger interface (called on the engine's output thread) --

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        with self._lock:
            if scheduler_stats is not None:
                self._gauges["running"] = scheduler_stats.num_running_reqs
                self._gauges["waiting"] = scheduler_stats.num_waiting_reqs
                self._gauges["kv_cache_usage"] = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                self._counts["prefix_cache_queries", ""] += prefix.queries
                self._counts["prefix_cache_hits", ""] += prefix.hits
            if iteration_stats is not None:
                self._counts["prompt_tokens", ""] += iteration_stats.num_prompt_tokens
                self._counts["generation_tokens", ""] += iteration_stats.num_generation_tokens
                self._counts["preemptions", ""] += iteration_stats.num_preempted_reqs
                self._observations["time_to_first_token"].extend(iteration_stats.time_to_first_tokens_iter)
                for finished in iteration_stats.finished_requests:
                    self._counts["success", str(finished.finish_reason)] += 1
                    for key, field in _PER_REQUEST.items():
                        self._observations[key].append(getattr(finished, field))

    def log(self) -> None:
        """vLLM's periodic call for its log lines: this logger writes none."""

    def log_engine_initialized(self) -> None:
        """vLLM's call once the engine is up: nothing to report."""

    # -- sending --

    def send(self) -> None:
        """Send what was recorded since the last call; gauges only where they changed."""
        with self._lock:
            counts, self._counts = self._counts, defaultdict(float)
            observations, self._observations = self._observations, defaultdict(list)
            gauges = {key: value for key, value in self._gauges.items() if self._sent_gauges.get(key) != value}
            self._sent_gauges.update(gauges)
        for (key, reason), amount in counts.items():
            if amount:
                self._metric(key, reason).increment(amount)
        for key, values in observations.items():
            metric = self._metric(key)
            for value in values:
                metric.observe(value)
        for key, value in gauges.items():
            self._metric(key).set(value)

    def close(self) -> None:
        """Stop the sending thread after a last send."""
        self._stopped.set()
        self._thread.join(timeout=5)

    def _send_periodically(self) -> None:
        while not self._stopped.wait(self._interval):
            self._send_logged()
        self._send_logged()

    def _send_logged(self) -> None:
        try:
            self.send()
        except Exception:  # metrics must never stop the engine's thread or the stub
            logger.warning("could not send vLLM's metrics", exc_info=True)

    def _metric(self, key: str, reason: str = "") -> Metric:
        metric = self._metrics.get((key, reason))
        if metric is None:
            labels = {**self._labels, "finished_reason": reason} if reason else self._labels
            metric = self._metrics[key, reason] = self._make_metric(self._specs[key], labels)
        return metric


def stat_logger_factory(make_metric: MetricFactory, labels: Mapping[str, str]) -> Callable[[Any, int], Any]:
    """What ``AsyncLLM(stat_loggers=[...])`` takes: a recorder per engine, labelled with its index."""

    def create(vllm_config: Any, engine_index: int = 0) -> EngineStatsRecorder:
        return EngineStatsRecorder(
            make_metric, {**labels, "engine": str(engine_index)}, int(vllm_config.model_config.max_model_len)
        )

    return create
