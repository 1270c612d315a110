"""Serving requests with the engine, free of Triton: tensor parsing and the generation thread.

The Triton adapter turns each request's input tensors into a dict of numpy arrays and wraps its
response sender in a :class:`ResponseSink`; everything else happens here, so it is tested
without a server. Requests wait in a queue served by one thread, one at a time (concurrent
requests and continuous batching come later).

Streaming contract, per request: one ``send_token`` per generated token, then exactly one of
``finish`` (with ``"stop"`` or ``"length"``), ``fail`` or ``cancelled``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from squint.errors import InvalidRequest, ModelNotReady, SquintError

from llm_worker.engine import FinishReason, GenerationRequest, LLMEngine, SamplingOptions

logger = logging.getLogger(__name__)


class ResponseSink(Protocol):
    """Where one request's stream goes (the adapter wraps Triton's response sender)."""

    def send_token(self, token_id: int) -> None:
        """Send one generated token (not final)."""

    def finish(self, reason: FinishReason) -> None:
        """Send the final response: no tokens, the finish reason."""

    def fail(self, error: SquintError) -> None:
        """Send the final response as an error; ``error.message`` is safe to show the client."""

    def cancelled(self) -> None:
        """Send the final response for a request the client cancelled."""

    def is_cancelled(self) -> bool:
        """Whether the client has cancelled the request."""


def _one(inputs: Mapping[str, np.ndarray], name: str) -> np.generic | None:
    """The single value of an optional ``[1]`` tensor, or ``None`` when the request omits it."""
    if name not in inputs:
        return None
    value = np.asarray(inputs[name])
    if value.size != 1:
        raise InvalidRequest(f"{name} must hold exactly one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0]


def _int(inputs: Mapping[str, np.ndarray], name: str, default: int) -> int:
    value = _one(inputs, name)
    return default if value is None else int(value)


def _float(inputs: Mapping[str, np.ndarray], name: str, default: float) -> float:
    value = _one(inputs, name)
    return default if value is None else float(value)


def parse_request(inputs: Mapping[str, np.ndarray], default_max_new_tokens: int) -> GenerationRequest:
    """Turn a request's input tensors (the Triton contract's names) into a :class:`GenerationRequest`.

    Raises :class:`InvalidRequest` naming the tensor that is wrong.
    """
    if "input_ids" not in inputs:
        raise InvalidRequest("the input tensor input_ids is missing")
    input_ids = np.asarray(inputs["input_ids"])
    if input_ids.ndim != 1 or input_ids.dtype.kind not in "iu":
        raise InvalidRequest(f"input_ids must be a 1-D integer tensor, got {input_ids.dtype} {list(input_ids.shape)}")
    visual_embeds = None
    if "visual_embeds" in inputs:
        visual = np.asarray(inputs["visual_embeds"])
        if visual.ndim != 2 or visual.dtype.kind != "f":
            raise InvalidRequest(
                "visual_embeds must be a 2-D float tensor [n_visual_tokens, hidden], "
                f"got {visual.dtype} {list(visual.shape)}"
            )
        visual_embeds = torch.from_numpy(np.array(visual, copy=True))  # [n_visual, hidden]
    stop_strings: tuple[str, ...] = ()
    if "stop" in inputs:
        try:
            stop_strings = tuple(
                s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in np.asarray(inputs["stop"]).reshape(-1)
            )
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"stop holds a string that is not UTF-8: {exc}") from None
    stop_token_ids = tuple(int(i) for i in np.asarray(inputs.get("stop_token_ids", np.zeros(0, np.int64))).reshape(-1))
    seed = _one(inputs, "seed")
    sampling = SamplingOptions(
        max_new_tokens=_int(inputs, "max_new_tokens", default_max_new_tokens),
        temperature=_float(inputs, "temperature", 0.0),
        top_k=_int(inputs, "top_k", 0),
        top_p=_float(inputs, "top_p", 1.0),
        seed=None if seed is None else int(seed),
        repetition_penalty=_float(inputs, "repetition_penalty", 1.0),
        stop_token_ids=stop_token_ids,
        stop=stop_strings,
    )
    return GenerationRequest(
        input_ids=torch.from_numpy(input_ids.astype(np.int64, copy=True)),  # [n_prompt]
        visual_embeds=visual_embeds,
        sampling=sampling,
    )


@dataclass(frozen=True)
class _Job:
    request_id: str
    request: GenerationRequest
    sink: ResponseSink


class GenerationLoop:
    """A queue of requests served by one background thread with one engine."""

    def __init__(self, engine: LLMEngine, default_max_new_tokens: int = 64) -> None:
        self._engine = engine
        self._default_max_new_tokens = default_max_new_tokens
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="squint-llm-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, request_id: str, inputs: Mapping[str, np.ndarray], sink: ResponseSink) -> None:
        """Queue a request; a malformed one is answered with an error at once."""
        if self._stopping.is_set():
            sink.fail(ModelNotReady("the LLM worker is shutting down; retry on another instance"))
            return
        try:
            request = parse_request(inputs, self._default_max_new_tokens)
        except InvalidRequest as exc:
            logger.info("request %s rejected: %s", request_id, exc.message)
            sink.fail(exc)
            return
        self._jobs.put(_Job(request_id, request, sink))

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running request, fail the queued ones, and join the thread."""
        self._stopping.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the generation thread did not stop within %.1f s", timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            if self._stopping.is_set():
                job.sink.fail(ModelNotReady("the LLM worker is shutting down; retry on another instance"))
                continue
            self._serve(job)
        # Anything queued behind the stop marker still gets its final response.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.sink.fail(ModelNotReady("the LLM worker is shutting down; retry on another instance"))

    def _serve(self, job: _Job) -> None:
        sink = job.sink

        def is_cancelled() -> bool:
            return self._stopping.is_set() or sink.is_cancelled()

        try:
            reason: FinishReason | None = None
            n_tokens = 0
            for step in self._engine.generate(job.request, is_cancelled=is_cancelled):
                sink.send_token(step.token_id)
                n_tokens += 1
                reason = step.finish_reason
            if reason is None:
                logger.info("request %s cancelled after %d tokens", job.request_id, n_tokens)
                if self._stopping.is_set():
                    sink.fail(ModelNotReady("the LLM worker is shutting down; retry on another instance"))
                else:
                    sink.cancelled()
                return
            logger.debug("request %s finished (%s) after %d tokens", job.request_id, reason, n_tokens)
            sink.finish(reason)
        except SquintError as exc:
            logger.info("request %s failed: %s", job.request_id, exc.message)
            _fail_quietly(sink, exc, job.request_id)
        except Exception:
            # The client sees no traceback; the log keeps it under the request id.
            logger.exception("request %s failed", job.request_id)
            _fail_quietly(sink, SquintError(f"internal error (request {job.request_id!r})"), job.request_id)


def _fail_quietly(sink: ResponseSink, error: SquintError, request_id: str) -> None:
    try:
        sink.fail(error)
    except Exception:
        # The stream may already be closed (the failure was sending); nothing is left to tell.
        logger.warning("request %s: could not send the error response", request_id, exc_info=True)


__all__ = ["GenerationLoop", "ResponseSink", "parse_request"]
