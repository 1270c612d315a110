"""Triton python-backend adapter for Squint's LLM worker (decoupled: one response per token).

Thin on purpose: settings, parsing, the engine and the generation thread live in the
installed ``llm_worker`` package. This is the only module that imports
``triton_python_backend_utils``; it maps Triton's request and response objects to
``llm_worker.serving`` and back.

Responses of one request: each generated token alone in ``token_ids`` with ``finish_reason``
"", then a final response, flagged COMPLETE_FINAL, with zero tokens and ``finish_reason``
"stop" or "length". A failed request ends with one error response (flagged final) instead.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers.utils import logging as transformers_logging

from llm_worker.engine import FinishReason, LLMEngine
from llm_worker.serving import GenerationLoop
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


class _Sink:
    """One request's response sender, as ``llm_worker.serving.ResponseSink``."""

    def __init__(self, request: pb_utils.InferenceRequest) -> None:
        self._sender = request.get_response_sender()
        # Triton older than 23.10 (2.39) has no request cancellation.
        self._is_cancelled = getattr(request, "is_cancelled", lambda: False)

    def send_token(self, token_id: int) -> None:
        self._sender.send(_response([token_id], ""))

    def finish(self, reason: FinishReason) -> None:
        self._sender.send(_response([], reason), flags=_FINAL)

    def fail(self, error: SquintError) -> None:
        if isinstance(error, InvalidRequest):
            code = pb_utils.TritonError.INVALID_ARG
        elif isinstance(error, ModelNotReady):
            code = pb_utils.TritonError.UNAVAILABLE
        else:
            code = pb_utils.TritonError.INTERNAL
        self._sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error.message, code)), flags=_FINAL)

    def cancelled(self) -> None:
        error = pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
        self._sender.send(pb_utils.InferenceResponse(error=error), flags=_FINAL)

    def is_cancelled(self) -> bool:
        return bool(self._is_cancelled())


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
            pack = settings.require_pack()
            engine = LLMEngine.load(pack.llava_dir, device=settings.device, dtype=settings.dtype)
        except Exception as exc:
            # Triton prints this as the model's load error: say what is wrong, not where.
            raise pb_utils.TritonModelException(f"squint_llm failed to load: {exc}") from None
        logger.info("squint_llm serves pack %s (%s) on %s", pack.id, pack.llava_dir, settings.device)
        self._loop = GenerationLoop(engine, default_max_new_tokens=settings.default_max_new_tokens)
        self._loop.start()

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        for request in requests:
            inputs = {}
            for name in _INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    # Copied: the request's shared memory may be reused once execute returns.
                    inputs[name] = np.array(tensor.as_numpy(), copy=True)
            self._loop.submit(request.request_id() or "-", inputs, _Sink(request))
        return None

    def finalize(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.stop()
