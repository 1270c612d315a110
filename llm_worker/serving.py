"""Serving requests with the engine, free of Triton: tensor parsing and the continuous-batching loop.

The Triton adapter turns each request's input tensors into a dict of numpy arrays and wraps its
response sender in a :class:`ResponseSink`; everything else happens here, so it is tested
without a server.

Scheduling (:class:`GenerationLoop`, one thread owns the engine): requests wait in a bounded
queue (``max_queue``; one more is refused at once with :class:`WorkerBusy`, an UNAVAILABLE
error). Each iteration of the loop

1. drops the sequences whose client cancelled or went away (their caches are freed);
2. admits queued requests while fewer than ``max_batch`` sequences are active, prefilling
   each admitted request on its own (one prefill per admitted request: prompts have
   hundreds of rows, so batching them buys little, and alone a prefill's numbers cannot
   depend on its neighbours) and sending its first token;
3. runs ONE batched decode step over every active sequence, whatever its prompt length,
   image count or per-layer cache lengths, and sends each its next token.

Responses leave through an outbox thread, in order per request, so sending (an IPC round trip
per response under Triton) overlaps the next decode step; the outbox is bounded, so a slow
sender slows the loop rather than piling tokens up.

A sequence's tokens equal those of running it alone (``LLMEngine.step`` is batch-invariant);
sampling state (generator, logits processors, stop conditions) is per sequence.

Streaming contract, per request: one ``send_token`` per generated token, then exactly one of
``finish`` (with ``"stop"`` or ``"length"``), ``fail`` or ``cancelled``.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from llm_worker.engine import (
    GenerationRequest,
    GenerationSequence,
    GenerationStep,
    LLMEngine,
    PreparedRequest,
    SamplingOptions,
)
from llm_worker.settings import SchedulerSettings
from llm_worker.spans import spans_from_tensors
from llm_worker.text_tensors import stop_strings
from squint.errors import InvalidRequest, ModelNotReady, SquintError

logger = logging.getLogger(__name__)

# How often queued requests are checked for cancellation (active ones: every step).
_QUEUE_CANCEL_CHECK_S = 0.5
# How often the load gauges are refreshed while the batch does not change.
_LOAD_REPORT_S = 0.1


class WorkerBusy(ModelNotReady):
    """Every batch slot and queue place is taken; the client should retry later (UNAVAILABLE)."""


class ResponseSink(Protocol):
    """Where one request's stream goes (the adapter wraps Triton's response sender)."""

    def send_token(self, token_id: int) -> None:
        """Send one generated token (not final)."""

    def finish(self, reason: str) -> None:
        """Send the final response: no tokens, the finish reason."""

    def fail(self, error: SquintError) -> None:
        """Send the final response as an error; ``error.message`` is safe to show the client."""

    def cancelled(self) -> None:
        """Send the final response for a request the client cancelled."""

    def is_cancelled(self) -> bool:
        """Whether the client has cancelled the request (or gone away)."""


# Metrics described apart from where they are kept (Triton custom metrics, in the adapter).
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


class Metric(Protocol):
    """One labelled metric, as Triton's ``pb_utils`` gives it."""

    def increment(self, value: float) -> None: ...

    def set(self, value: float) -> None: ...

    def observe(self, value: float) -> None: ...


@dataclass(frozen=True)
class MetricSpec:
    name: str
    description: str
    kind: str
    buckets: tuple[float, ...] | None = None


#: ``make_metric(spec, labels)``: the metric of ``spec`` with those labels (created once per pair).
MetricFactory = Callable[[MetricSpec, Mapping[str, str]], Metric]


class ServingMetrics(Protocol):
    """What the loop reports; the adapter turns it into Triton custom metrics. Called from the loop's thread."""

    def count_request(self, prompt_tokens: int, visual_tokens: int) -> None:
        """A request was admitted: its prompt tokens and its visual tokens after compression."""

    def count_generated(self, tokens: int) -> None:
        """Tokens sent to clients."""

    def set_load(self, active: int, queued: int, kv_bytes: int) -> None:
        """Sequences in the batch, requests waiting, and the bytes of KV cache the batch holds."""


class NoMetrics:
    """A :class:`ServingMetrics` that records nothing."""

    def count_request(self, prompt_tokens: int, visual_tokens: int) -> None:
        pass

    def count_generated(self, tokens: int) -> None:
        pass

    def set_load(self, active: int, queued: int, kv_bytes: int) -> None:
        pass


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
    stop = stop_strings(inputs["stop"]) if "stop" in inputs else ()
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
        stop=stop,
    )
    return GenerationRequest(
        input_ids=torch.from_numpy(input_ids.astype(np.int64, copy=True)),  # [n_prompt]
        visual_embeds=visual_embeds,
        sampling=sampling,
        image_spans=spans_from_tensors(inputs),
    )


def read_request(
    prepare: Callable[[GenerationRequest], PreparedRequest],
    inputs: Mapping[str, np.ndarray],
    default_max_new_tokens: int,
    sink: ResponseSink,
    request_id: str,
) -> PreparedRequest | None:
    """The request ``inputs`` carry, checked by ``prepare``; ``None`` once a malformed one has been
    answered (its error sent to ``sink``). Both engines' ``submit`` start here."""
    try:
        return prepare(parse_request(inputs, default_max_new_tokens))
    except InvalidRequest as exc:
        logger.info("request %s rejected: %s", request_id, exc.message)
        fail_quietly(sink, exc, request_id)
    except Exception:
        logger.exception("request %s could not be read", request_id)
        fail_quietly(sink, internal_error(request_id), request_id)
    return None


def warm_up(engine: LLMEngine) -> None:
    """Run one tiny request through prefill and a decode step, so the first client pays no first-call costs."""
    request = GenerationRequest(torch.zeros(2, dtype=torch.long), sampling=SamplingOptions(max_new_tokens=2))
    for _ in engine.generate(request):
        pass


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors
class _Job:
    request_id: str
    request: PreparedRequest
    sink: ResponseSink
    # Set by the outbox when sending failed: the request already got its error, the loop drops it.
    broken: threading.Event = field(default_factory=threading.Event)


class _Outbox:
    """Sends responses from a thread of its own, first in first out, so sending overlaps decoding."""

    def __init__(self, capacity: int) -> None:
        self._items: queue.Queue[tuple[_Job, str, object] | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="squint-llm-send", daemon=True)
        self._thread.start()

    def token(self, job: _Job, token_id: int) -> None:
        self._items.put((job, "token", token_id))  # blocks while the outbox is full

    def finish(self, job: _Job, reason: str) -> None:
        self._items.put((job, "finish", reason))

    def fail(self, job: _Job, error: SquintError) -> None:
        self._items.put((job, "fail", error))

    def cancelled(self, job: _Job) -> None:
        self._items.put((job, "cancelled", None))

    def close(self, timeout: float) -> None:
        """Send what is posted, then end the thread."""
        self._items.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._items.get()) is not None:
            job, kind, value = item
            # A finished request must not stay referenced while this waits for the next item:
            # its Triton request (and the input memory it holds) is freed with the last reference.
            del item
            if job.broken.is_set():
                continue  # its stream ended with an error already
            try:
                if kind == "token":
                    job.sink.send_token(value)
                elif kind == "finish":
                    job.sink.finish(value)
                elif kind == "fail":
                    job.sink.fail(value)
                else:
                    job.sink.cancelled()
            except Exception:
                job.broken.set()
                if kind == "token":
                    # The client sees no traceback; the log keeps it under the request id.
                    logger.exception("request %s failed while sending", job.request_id)
                    fail_quietly(job.sink, internal_error(job.request_id), job.request_id)
                else:
                    logger.warning("request %s: could not send its final response", job.request_id, exc_info=True)
            finally:
                del job, value


@dataclass
class _Active:
    """A request in the batch (mutable bookkeeping of the loop's thread)."""

    job: _Job
    sequence: GenerationSequence


_SHUTTING_DOWN = "the LLM worker is shutting down; retry on another instance"


class GenerationLoop:
    """Continuous batching over one engine, in one background thread."""

    def __init__(
        self,
        engine: LLMEngine,
        default_max_new_tokens: int = 64,
        settings: SchedulerSettings | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._default_max_new_tokens = default_max_new_tokens
        self.settings = settings or SchedulerSettings()
        self._metrics: ServingMetrics = metrics or NoMetrics()
        self._queue: collections.deque[_Job] = collections.deque()
        self._active: list[_Active] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._queue_checked_at = 0.0
        self._reported: tuple[int, int] | None = None
        self._reported_at = 0.0
        self._generated = 0  # tokens generated since the last report
        self._outbox: _Outbox | None = None
        self._thread = threading.Thread(target=self._run, name="squint-llm-generate", daemon=True)

    def start(self) -> None:
        # Room for a few steps of every slot, and the final responses.
        self._outbox = _Outbox(capacity=4 * self.settings.max_batch + 16)
        self._thread.start()

    def submit(self, request_id: str, inputs: Mapping[str, np.ndarray], sink: ResponseSink) -> None:
        """Queue a request; a malformed one, or one that finds the queue full, is answered at once."""
        request = read_request(self._engine.prepare, inputs, self._default_max_new_tokens, sink, request_id)
        if request is None:
            return
        with self._wake:
            if self._stopping:
                refusal: SquintError | None = ModelNotReady(_SHUTTING_DOWN)
            elif len(self._queue) >= self.settings.max_queue:
                refusal = WorkerBusy(
                    f"the LLM worker is busy and unavailable for new requests: {self.settings.max_batch} are "
                    f"generating and {len(self._queue)} wait (max_queue {self.settings.max_queue}); retry later "
                    "or on another instance"
                )
            else:
                refusal = None
                self._queue.append(_Job(request_id, request, sink))
                self._wake.notify()
        if refusal is not None:
            logger.info("request %s refused: %s", request_id, refusal.message)
            fail_quietly(sink, refusal, request_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step: every running and queued request fails as shutting down."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the generation thread did not stop within %.1f s", timeout)

    # -- the loop's thread --

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._queue and not self._active:
                        self._wake.wait()
                    if self._stopping:
                        break
                    free = self.settings.max_batch - len(self._active)
                    admitted = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
                self._drop_cancelled()
                # No loop variable here: this frame lives as long as the model and would keep
                # the last admitted request (and its Triton request object) referenced.
                self._admit_all(admitted)
                del admitted
                self._decode()
                self._report()
        except Exception:
            logger.exception("the generation loop failed; failing every request it holds")
        finally:
            self._shut_down()

    @property
    def _out(self) -> _Outbox:
        assert self._outbox is not None, "start() the loop first"
        return self._outbox

    def _shut_down(self) -> None:
        with self._wake:
            self._stopping = True
            queued, self._queue = list(self._queue), collections.deque()
        for active in self._active:
            active.sequence.release()
            self._out.fail(active.job, ModelNotReady(_SHUTTING_DOWN))
        self._active = []
        for job in queued:
            self._out.fail(job, ModelNotReady(_SHUTTING_DOWN))
        self._report(force=True)
        self._out.close(timeout=10.0)

    def _drop_cancelled(self) -> None:
        """Free the slots (and caches) of requests whose client cancelled or went away."""
        kept = []
        for active in self._active:
            if active.job.broken.is_set():
                active.sequence.release()  # sending failed; the outbox sent the error
            elif _is_cancelled(active.job):
                active.sequence.release()
                logger.info(
                    "request %s cancelled after %d tokens; its slot is free",
                    active.job.request_id,
                    active.sequence.n_generated,
                )
                self._out.cancelled(active.job)
            else:
                kept.append(active)
        self._active = kept
        now = time.monotonic()
        if now - self._queue_checked_at >= _QUEUE_CANCEL_CHECK_S:
            self._queue_checked_at = now
            with self._wake:
                queued = list(self._queue)
            gone = [job for job in queued if _is_cancelled(job)]
            if gone:
                with self._wake:
                    self._queue = collections.deque(job for job in self._queue if job not in gone)  # by identity
                for job in gone:
                    logger.info("request %s cancelled while queued", job.request_id)
                    self._out.cancelled(job)

    def _admit_all(self, jobs: list[_Job]) -> None:
        for job in jobs:
            self._admit(job)

    def _admit(self, job: _Job) -> None:
        """Prefill one request and send its first token; it joins the batch unless that was its last."""
        if _is_cancelled(job):
            logger.info("request %s cancelled before it started", job.request_id)
            self._out.cancelled(job)
            return
        try:
            sequence = self._engine.start(job.request)
        except SquintError as exc:
            logger.info("request %s failed: %s", job.request_id, exc.message)
            self._out.fail(job, exc)
            return
        except Exception:
            # The client sees no traceback; the log keeps it under the request id.
            logger.exception("request %s failed in its prefill", job.request_id)
            self._out.fail(job, internal_error(job.request_id))
            return
        self._metrics.count_request(job.request.prompt_tokens, job.request.visual_tokens)
        active = _Active(job, sequence)
        if self._emit(active):
            self._active.append(active)

    def _decode(self) -> None:
        """One batched forward over every active sequence, then each sends its next token."""
        if not self._active:
            return
        try:
            self._engine.step([active.sequence for active in self._active])
        except Exception:
            # Which sequence broke the step is unknown: fail them all, keep serving the queue.
            logger.exception("a decode step over %d sequences failed", len(self._active))
            for active in self._active:
                active.sequence.release()
                self._out.fail(active.job, internal_error(active.job.request_id))
            self._active = []
            return
        self._active = [active for active in self._active if self._emit(active)]

    def _emit(self, active: _Active) -> bool:
        """Choose the sequence's next token and post it; ``True`` while the sequence goes on."""
        job, sequence = active.job, active.sequence
        try:
            step: GenerationStep = sequence.choose()
        except Exception:
            logger.exception("request %s failed choosing a token", job.request_id)
            self._out.fail(job, internal_error(job.request_id))
            sequence.release()
            return False
        self._out.token(job, step.token_id)
        self._generated += 1
        if step.finish_reason is None:
            return True
        logger.debug(
            "request %s finished (%s) after %d tokens", job.request_id, step.finish_reason, sequence.n_generated
        )
        self._out.finish(job, step.finish_reason)
        sequence.release()
        return False

    def _report(self, force: bool = False) -> None:
        """Count the tokens generated since the last report; refresh the load gauges when the
        batch or queue changed, else at most every 0.1 s (each report is an IPC under Triton)."""
        if self._generated:
            self._metrics.count_generated(self._generated)
            self._generated = 0
        with self._wake:
            queued = len(self._queue)
        now = time.monotonic()
        counts = (len(self._active), queued)
        if not force and counts == self._reported and now - self._reported_at < _LOAD_REPORT_S:
            return
        self._reported, self._reported_at = counts, now
        kv_bytes = sum(active.sequence.kv_bytes() for active in self._active)
        self._metrics.set_load(len(self._active), queued, kv_bytes)


def internal_error(request_id: str) -> SquintError:
    return SquintError(f"internal error (request {request_id!r})")


def _is_cancelled(job: _Job) -> bool:
    return sink_cancelled(job.sink, job.request_id)


def sink_cancelled(sink: ResponseSink, request_id: str) -> bool:
    """Whether the request's client cancelled; a state that cannot be read counts as cancelled."""
    try:
        return sink.is_cancelled()
    except Exception:
        # A request whose state cannot be read any more has no client left to serve.
        logger.warning(
            "request %s: reading its cancellation failed; treating it as cancelled", request_id, exc_info=True
        )
        return True


def fail_quietly(sink: ResponseSink, error: SquintError, request_id: str) -> None:
    try:
        sink.fail(error)
    except Exception:
        # The stream may already be closed (the failure was sending); nothing is left to tell.
        logger.warning("request %s: could not send the error response", request_id, exc_info=True)


__all__ = [
    "GenerationLoop",
    "NoMetrics",
    "ResponseSink",
    "ServingMetrics",
    "WorkerBusy",
    "fail_quietly",
    "internal_error",
    "parse_request",
    "read_request",
    "sink_cancelled",
    "warm_up",
]
