"""Triton python-backend adapters of Squint's two LLM engines (decoupled: one response per output).

The only module that imports ``triton_python_backend_utils``; the model repository's
``model.py`` files name their class here and nothing else:

- ``squint_llm`` (:class:`VLLMModel`): vLLM on the pack's language model, the prompt as
  embeddings (:mod:`llm_worker.vllm_engine`);
- ``squint_llm_staged`` (:class:`StagedModel`): Squint's own engine (:mod:`llm_worker.engine`),
  for in-LLM pooling (image spans) and the reference-exact modes.

Both take the same inputs (config.pbtxt): ``input_ids`` [n_prompt] INT64; optional
``visual_embeds`` [n_visual, hidden] (FP32 on CPU, FP16 on GPU), ``max_new_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``repetition_penalty``, ``stop_token_ids``,
``stop`` (UINT8: a UTF-8 JSON array, :mod:`llm_worker.text_tensors`); ``squint_llm_staged`` also
``image_spans`` [n_spans, 5] INT64 and ``reference_mode`` [n_spans] BOOL (:mod:`llm_worker.spans`).
Every tensor crosses by DLPack: the stub cannot convert numpy 2 arrays.

Responses of one request: the generated tokens in ``token_ids`` with an empty ``finish_reason``
(UINT8), then a final response, flagged COMPLETE_FINAL, with zero tokens and ``finish_reason``
"stop" or "length". A failed request ends with one error response (flagged final) instead:
INVALID_ARG for a bad request (its message starts with ``llm_worker.INVALID_REQUEST_PREFIX``,
as stream responses carry no code), UNAVAILABLE when the worker is busy (queue full) or shutting
down, CANCELLED for a cancelled one, INTERNAL "internal error (request ...)" otherwise; no
message carries a traceback.

Metrics (beside Triton's own on the metrics endpoint, labels ``model`` and ``version``):
``squint_llm_prompt_tokens_total``, ``squint_llm_generated_tokens_total``,
``squint_llm_visual_tokens_total`` (counters), ``squint_llm_kv_cache_bytes``,
``squint_llm_active_sequences``, ``squint_llm_queued_requests`` (gauges); on ``squint_llm``,
vLLM's own ``vllm:*`` too (:mod:`llm_worker.vllm_metrics`).
"""

from __future__ import annotations

import locale
import logging
import sys
from collections.abc import Mapping

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack
from transformers import AutoConfig
from transformers.utils import logging as transformers_logging

from llm_worker import INVALID_REQUEST_PREFIX
from llm_worker.engine import LLMEngine
from llm_worker.serving import COUNTER, GAUGE, HISTOGRAM, GenerationLoop, Metric, MetricSpec, warm_up
from llm_worker.settings import settings_from_triton_args
from llm_worker.text_tensors import finish_reason_tensor
from squint.errors import InvalidRequest, ModelNotReady, SquintError

logger = logging.getLogger("llm_worker.triton")

_INPUTS = (
    "input_ids",
    "visual_embeds",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "repetition_penalty",
    "stop_token_ids",
    "stop",
    "image_spans",
    "reference_mode",
)
_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _TritonLogHandler(logging.Handler):
    """Sends our log records to Triton's log, so one file tells the whole story."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        elif record.levelno >= logging.INFO:
            pb_utils.Logger.log_info(message)
        else:
            pb_utils.Logger.log_verbose(message)


def _tensor(name: str, array: np.ndarray) -> pb_utils.Tensor:
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.from_numpy(array)))


def _response(token_ids: list[int], finish_reason: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        output_tensors=[
            _tensor("token_ids", np.asarray(token_ids, dtype=np.int64)),  # [n_new]
            _tensor("finish_reason", finish_reason_tensor(finish_reason)),  # [n_bytes]
        ]
    )


def _read_inputs(request: pb_utils.InferenceRequest) -> dict[str, np.ndarray]:
    inputs = {}
    for name in _INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            # Copied: the request's shared memory may be reused once execute returns.
            inputs[name] = from_dlpack(tensor.to_dlpack()).clone().numpy()
    return inputs


def _error(error: SquintError) -> pb_utils.TritonError:
    if isinstance(error, InvalidRequest):
        return pb_utils.TritonError(INVALID_REQUEST_PREFIX + error.message, pb_utils.TritonError.INVALID_ARG)
    if isinstance(error, ModelNotReady):  # WorkerBusy included
        code = pb_utils.TritonError.UNAVAILABLE
    else:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(error.message, code)


class _Sink:
    """One request's response sender, as ``llm_worker.serving.ResponseSink``."""

    def __init__(self, request: pb_utils.InferenceRequest) -> None:
        self._sender = request.get_response_sender()
        # Triton older than 23.10 (2.39) has no request cancellation.
        self._is_cancelled = getattr(request, "is_cancelled", lambda: False)

    def send_token(self, token_id: int) -> None:
        self._sender.send(_response([token_id], ""))

    def send_tokens(self, token_ids: list[int]) -> None:
        self._sender.send(_response(token_ids, ""))

    def finish(self, reason: str) -> None:
        self._sender.send(_response([], reason), flags=_FINAL)

    def fail(self, error: SquintError) -> None:
        self._sender.send(pb_utils.InferenceResponse(error=_error(error)), flags=_FINAL)

    def cancelled(self) -> None:
        error = pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
        self._sender.send(pb_utils.InferenceResponse(error=error), flags=_FINAL)

    def is_cancelled(self) -> bool:
        return bool(self._is_cancelled())


class _TritonMetricFactory:
    """``llm_worker.serving.MetricFactory`` on Triton custom metrics: one family per name,
    kept for as long as its metrics (Triton drops a family's metrics with it)."""

    def __init__(self) -> None:
        self._kinds = {
            COUNTER: pb_utils.MetricFamily.COUNTER,
            GAUGE: pb_utils.MetricFamily.GAUGE,
            HISTOGRAM: pb_utils.MetricFamily.HISTOGRAM,
        }
        self._families: dict[str, pb_utils.MetricFamily] = {}

    def __call__(self, spec: MetricSpec, labels: Mapping[str, str]) -> Metric:
        family = self._families.get(spec.name)
        if family is None:
            family = pb_utils.MetricFamily(name=spec.name, description=spec.description, kind=self._kinds[spec.kind])
            self._families[spec.name] = family
        if spec.buckets is None:
            return family.Metric(labels=dict(labels))
        return family.Metric(labels=dict(labels), buckets=list(spec.buckets))


class _Metrics:
    """``llm_worker.serving.ServingMetrics`` as Triton custom metrics; gauges are sent only when they change."""

    def __init__(self, labels: dict[str, str]) -> None:
        specs = {
            "prompt": MetricSpec(
                "squint_llm_prompt_tokens_total",
                "Prompt tokens of admitted requests (image placeholders included)",
                COUNTER,
            ),
            "generated": MetricSpec("squint_llm_generated_tokens_total", "Tokens generated for clients", COUNTER),
            "visual": MetricSpec(
                "squint_llm_visual_tokens_total",
                "Visual tokens after compression (in-LLM pooled spans at their pooled length)",
                COUNTER,
            ),
            "kv": MetricSpec("squint_llm_kv_cache_bytes", "Bytes of KV cache held by the active sequences", GAUGE),
            "active": MetricSpec("squint_llm_active_sequences", "Sequences in the decode batch", GAUGE),
            "queued": MetricSpec("squint_llm_queued_requests", "Requests waiting for a batch slot", GAUGE),
        }
        self._make_metric = _TritonMetricFactory()  # keeps the families, which must outlive their metrics
        self._metrics = {key: self._make_metric(spec, labels) for key, spec in specs.items()}
        self._gauges = (-1, -1, -1)

    def count_request(self, prompt_tokens: int, visual_tokens: int) -> None:
        self._metrics["prompt"].increment(prompt_tokens)
        if visual_tokens:
            self._metrics["visual"].increment(visual_tokens)

    def count_generated(self, tokens: int) -> None:
        self._metrics["generated"].increment(tokens)

    def set_load(self, active: int, queued: int, kv_bytes: int) -> None:
        gauges = (active, queued, kv_bytes)
        for key, value, last in zip(("active", "queued", "kv"), gauges, self._gauges):
            if value != last:
                self._metrics[key].set(value)
        self._gauges = gauges


def _install_log_handler() -> None:
    root = logging.getLogger("llm_worker")
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        handler = _TritonLogHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    # A server log has no use for the weight-loading progress bar.
    transformers_logging.disable_progress_bar()
    logger.info("python %s at %s", sys.version.split()[0], sys.prefix)


def _metric_labels(args: dict[str, str], default_name: str) -> dict[str, str]:
    return {"model": args.get("model_name", default_name), "version": args.get("model_version", "1")}


class _Model:
    """What both models share: requests in, the loop's ``submit``, the loop stopped at unload."""

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        for request in requests:
            request_id = request.request_id() or "-"
            try:
                inputs = _read_inputs(request)
                sink = _Sink(request)
            except Exception:
                logger.exception("request %s could not be read", request_id)
                error = pb_utils.TritonError(f"internal error (request {request_id!r})", pb_utils.TritonError.INTERNAL)
                request.get_response_sender().send(pb_utils.InferenceResponse(error=error), flags=_FINAL)
                continue
            self._loop.submit(request_id, inputs, sink)
        return None

    def finalize(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.stop()


class StagedModel(_Model):
    """``squint_llm_staged``: Squint's own engine, for in-LLM pooling and the reference-exact modes."""

    def initialize(self, args: dict[str, str]) -> None:
        _install_log_handler()
        name = args.get("model_name", "squint_llm_staged")
        try:
            settings = settings_from_triton_args(args)
            scheduler = settings.scheduler()
            pack = settings.require_pack()
            engine = LLMEngine.load(
                pack.llava_dir, device=settings.device, dtype=settings.dtype, decode_tile=settings.decode_tile
            )
            # Ready means warm: the first client pays no first-call costs.
            warm_up(engine)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to Triton the same way
            # Triton prints this as the model's load error: say what is wrong, not where.
            raise pb_utils.TritonModelException(f"{name} failed to load: {exc}") from None
        logger.info(
            "%s serves pack %s (%s) on %s: max_batch %d, max_queue %d",
            name,
            pack.id,
            pack.llava_dir,
            settings.device,
            scheduler.max_batch,
            scheduler.max_queue,
        )
        self._loop = GenerationLoop(
            engine,
            default_max_new_tokens=settings.default_max_new_tokens,
            settings=scheduler,
            metrics=_Metrics(_metric_labels(args, name)),
        )
        self._loop.start()


class VLLMModel(_Model):
    """``squint_llm``: vLLM on the pack's language model, the prompt as embeddings."""

    def initialize(self, args: dict[str, str]) -> None:
        # The stub runs with an ASCII locale, and torch's inductor (imported by vLLM) reads
        # UTF-8 templates.
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
        _install_log_handler()
        name = args.get("model_name", "squint_llm")
        try:
            from llm_worker.vllm_engine import VLLMGenerationLoop
            from llm_worker.vllm_metrics import stat_logger_factory

            settings = settings_from_triton_args(args)
            settings.scheduler()  # checks the batching limits
            pack = settings.require_pack()
            language_model_dir = pack.require_language_model()
            image_token_index = int(AutoConfig.from_pretrained(pack.llava_dir).image_token_index)
            labels = _metric_labels(args, name)
            loop = VLLMGenerationLoop(
                settings,
                language_model_dir,
                image_token_index,
                metrics=_Metrics(labels),
                stat_loggers=[stat_logger_factory(_TritonMetricFactory(), labels)],
            )
            loop.start()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to Triton the same way
            raise pb_utils.TritonModelException(f"{name} failed to load: {exc}") from None
        logger.info(
            "%s serves pack %s (%s) on vLLM, %s: max_batch %d, max_queue %d",
            name,
            pack.id,
            language_model_dir,
            settings.device,
            settings.max_batch,
            settings.max_queue,
        )
        self._loop = loop
