"""Triton python-backend adapter for Squint's LLM worker (decoupled: one response per token).

Thin on purpose: settings, parsing, the engine and the continuous-batching loop live in the
installed ``llm_worker`` package. This is the only module that imports
``triton_python_backend_utils``; it maps Triton's request, response and metric objects to
``llm_worker.serving`` and back.

Inputs (see config.pbtxt): ``input_ids`` [n_prompt] INT64; optional ``visual_embeds``
[n_visual, hidden] (FP32 on CPU, FP16 on GPU), ``max_new_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``repetition_penalty``, ``stop_token_ids``, ``stop``;
optional ``image_spans`` [n_spans, 5] INT64, one row per image span to pool inside the LLM
(LLaVolta): (start index in input_ids, span length, layer K, stride S, shape code
1 = 1d / 2 = 2d); optional ``reference_mode`` [n_spans] BOOL, per row: pooled position ids as
the released code computes them (float16 means); one value applies to every row
(``llm_worker.spans`` reads both).

Responses of one request: each generated token alone in ``token_ids`` with ``finish_reason``
"", then a final response, flagged COMPLETE_FINAL, with zero tokens and ``finish_reason``
"stop" or "length". A failed request ends with one error response (flagged final) instead:
INVALID_ARG for a bad request (its message starts with ``llm_worker.INVALID_REQUEST_PREFIX``,
as stream responses carry no code), UNAVAILABLE when the worker is busy (queue full) or shutting
down, CANCELLED for a cancelled one, INTERNAL "internal error (request ...)" otherwise; no
message carries a traceback.

Metrics (beside Triton's own on the metrics endpoint, labels ``model`` and ``version``):
``squint_llm_prompt_tokens_total``, ``squint_llm_generated_tokens_total``,
``squint_llm_visual_tokens_total`` (counters), ``squint_llm_kv_cache_bytes``,
``squint_llm_active_sequences``, ``squint_llm_queued_requests`` (gauges).
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers.utils import logging as transformers_logging

from llm_worker import INVALID_REQUEST_PREFIX
from llm_worker.engine import LLMEngine
from llm_worker.serving import GenerationLoop, warm_up
from llm_worker.settings import settings_from_triton_args
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


def _response(token_ids: list[int], finish_reason: str) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("token_ids", np.asarray(token_ids, dtype=np.int64)),  # [n_new]
            pb_utils.Tensor("finish_reason", np.asarray([finish_reason.encode()], dtype=np.object_)),  # [1]
        ]
    )


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

    def finish(self, reason: str) -> None:
        self._sender.send(_response([], reason), flags=_FINAL)

    def fail(self, error: SquintError) -> None:
        self._sender.send(pb_utils.InferenceResponse(error=_error(error)), flags=_FINAL)

    def cancelled(self) -> None:
        error = pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
        self._sender.send(pb_utils.InferenceResponse(error=error), flags=_FINAL)

    def is_cancelled(self) -> bool:
        return bool(self._is_cancelled())


class _Metrics:
    """``llm_worker.serving.ServingMetrics`` as Triton custom metrics; gauges are sent only when they change."""

    def __init__(self, labels: dict[str, str]) -> None:
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        specs = {
            "prompt": (
                "squint_llm_prompt_tokens_total",
                "Prompt tokens of admitted requests (image placeholders included)",
                counter,
            ),
            "generated": ("squint_llm_generated_tokens_total", "Tokens generated for clients", counter),
            "visual": (
                "squint_llm_visual_tokens_total",
                "Visual tokens after compression (in-LLM pooled spans at their pooled length)",
                counter,
            ),
            "kv": ("squint_llm_kv_cache_bytes", "Bytes of KV cache held by the active sequences", gauge),
            "active": ("squint_llm_active_sequences", "Sequences in the decode batch", gauge),
            "queued": ("squint_llm_queued_requests", "Requests waiting for a batch slot", gauge),
        }
        # Families must outlive their metrics: keep both.
        self._families = {key: pb_utils.MetricFamily(name=n, description=d, kind=k) for key, (n, d, k) in specs.items()}
        self._metrics = {key: family.Metric(labels=labels) for key, family in self._families.items()}
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


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        root = logging.getLogger("llm_worker")
        if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
            handler = _TritonLogHandler()
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            root.addHandler(handler)
            root.setLevel(logging.INFO)
        # A server log has no use for the weight-loading progress bar.
        transformers_logging.disable_progress_bar()
        logger.info("python %s at %s", sys.version.split()[0], sys.prefix)
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
            raise pb_utils.TritonModelException(f"squint_llm failed to load: {exc}") from None
        logger.info(
            "squint_llm serves pack %s (%s) on %s: max_batch %d, max_queue %d",
            pack.id,
            pack.llava_dir,
            settings.device,
            scheduler.max_batch,
            scheduler.max_queue,
        )
        metrics = _Metrics({"model": args.get("model_name", "squint_llm"), "version": args.get("model_version", "1")})
        self._loop = GenerationLoop(
            engine, default_max_new_tokens=settings.default_max_new_tokens, settings=scheduler, metrics=metrics
        )
        self._loop.start()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        for request in requests:
            request_id = request.request_id() or "-"
            try:
                inputs = {}
                for name in _INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        # Copied: the request's shared memory may be reused once execute returns.
                        inputs[name] = np.array(tensor.as_numpy(), copy=True)
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
