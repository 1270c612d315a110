"""Serving requests on vLLM: the pack's language model continuing prompts given as embeddings.

vLLM (``AsyncLLM``) brings paged attention, continuous and chunked-prefill batching, prefix
caching, CUDA graphs, tensor parallelism and quantization; Squint gives it the prompt as
embeddings (``{"prompt_embeds": [n_prompt, hidden]}``): the token ids embedded with the language
model's own table and the visual tokens spliced over the image placeholders
(:func:`llm_worker.requests.prompt_embeddings`, the function the staged engine uses too). In
float32, greedy, this gives exactly the tokens of ``LlavaForConditionalGeneration.generate``.
In-LLM pooling (image spans) is refused here: the staged engine (``squint_llm_staged``) serves it.

:class:`VLLMGenerationLoop` owns an asyncio event loop in a thread of its own, on which the
engine runs; ``submit`` is called from Triton's ``execute`` thread and returns at once. Per
request: one response per engine output (usually one token, several when the sender fell
behind), then the final one with the finish reason, through the same
:class:`~llm_worker.serving.ResponseSink` as the staged engine. A cancelled request (its client
gone) is aborted in vLLM, which frees its slot. Nothing here knows about Triton.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from llm_worker import vllm_worker_idle
from llm_worker.requests import PreparedRequest, PromptChecks, SamplingOptions, prompt_embeddings
from llm_worker.serving import (
    NoMetrics,
    ResponseSink,
    ServingMetrics,
    WorkerBusy,
    fail_quietly,
    internal_error,
    read_request,
    sink_cancelled,
)
from llm_worker.settings import LLMWorkerSettings
from squint.errors import InvalidRequest, ModelNotReady, SquintError

logger = logging.getLogger(__name__)

# How often in-flight requests are checked for a cancelled client.
_CANCEL_CHECK_S = 0.1
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The KV cache vLLM reserves on CPU unless vllm_kv_cache_bytes says otherwise.
CPU_KV_CACHE_BYTES = 512 * 1024**2
# How long vLLM's worker polls for its next step on CPU (idle_spin_seconds).
CPU_IDLE_SPIN_SECONDS = 0.1
# vLLM takes a signed 64-bit seed; Squint's API takes unsigned ones.
_SEED_MODULUS = 2**63


def load_input_embeddings(language_model_dir: Path, dtype: torch.dtype) -> torch.nn.Embedding:
    """The language model's token-embedding table alone, read from its safetensors files."""
    config = AutoConfig.from_pretrained(language_model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    table = skeleton.get_input_embeddings()
    name = next(n for n, p in skeleton.named_parameters() if p is table.weight)
    index = language_model_dir / "model.safetensors.index.json"
    filename = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
    with safe_open(language_model_dir / filename, framework="pt") as weights:
        weight = weights.get_tensor(name).to(dtype)  # [vocab, hidden]
    return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def sampling_params(options: SamplingOptions):
    """vLLM's ``SamplingParams`` for Squint's options, one to one; outputs as deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        max_tokens=options.max_new_tokens,
        temperature=options.temperature,
        top_k=options.top_k,  # 0: no filter, as in Squint
        top_p=options.top_p,
        seed=None if options.seed is None else options.seed % _SEED_MODULUS,
        repetition_penalty=options.repetition_penalty,
        stop=list(options.stop) or None,
        stop_token_ids=list(options.stop_token_ids) or None,
        output_kind=RequestOutputKind.DELTA,
    )


def engine_args(settings: LLMWorkerSettings, language_model_dir: Path):
    """vLLM's ``AsyncEngineArgs`` from the worker's settings."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    on_cpu = settings.device == "cpu"
    # "auto" means the checkpoint's dtype, as on the staged engine: vLLM's own "auto" would run a
    # float32 checkpoint in bfloat16 on CPU.
    dtype = settings.dtype
    if dtype == "auto":
        dtype = str(_checkpoint_dtype(AutoConfig.from_pretrained(language_model_dir))).removeprefix("torch.")
    return AsyncEngineArgs(
        model=str(language_model_dir),
        dtype=dtype,
        enable_prompt_embeds=True,
        max_model_len=settings.vllm_max_model_len or None,
        max_num_seqs=settings.max_batch,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        enable_chunked_prefill=settings.vllm_chunked_prefill,
        enable_prefix_caching=settings.vllm_prefix_caching,
        enforce_eager=settings.vllm_enforce_eager or on_cpu,
        gpu_memory_utilization=settings.vllm_memory_fraction,
        # On CPU the KV cache gets a fixed size: vLLM's default reserves most of the machine's memory.
        kv_cache_memory_bytes=settings.vllm_kv_cache_bytes or (CPU_KV_CACHE_BYTES if on_cpu else None),
        seed=0,
        worker_extension_cls=vllm_worker_idle.EXTENSION if idle_spin_seconds(settings) is not None else "",
        disable_log_stats=not settings.vllm_metrics,
    )


class VLLMGenerationLoop:
    """vLLM's ``AsyncLLM`` serving :class:`~llm_worker.serving.ResponseSink` requests from any thread."""

    def __init__(
        self,
        settings: LLMWorkerSettings,
        language_model_dir: Path,
        image_token_index: int,
        *,
        metrics: ServingMetrics | None = None,
        stat_loggers: Sequence[Callable[[Any, int], Any]] = (),
    ) -> None:
        """``stat_loggers``: vLLM stat-logger factories (``llm_worker.vllm_metrics``), used when
        ``settings.vllm_metrics`` is on."""
        self._settings = settings
        self._stat_loggers = list(stat_loggers) if settings.vllm_metrics else []
        self._language_model_dir = language_model_dir
        self._metrics: ServingMetrics = metrics or NoMetrics()
        config = AutoConfig.from_pretrained(language_model_dir)
        dtype = _TORCH_DTYPES[settings.dtype] if settings.dtype != "auto" else _checkpoint_dtype(config)
        self._embed_tokens = load_input_embeddings(language_model_dir, dtype)
        vocab, hidden = self._embed_tokens.weight.shape
        self._image_token_index = image_token_index
        max_context = int(config.max_position_embeddings)
        if settings.vllm_max_model_len:
            max_context = min(max_context, settings.vllm_max_model_len)
        self.checks = PromptChecks(
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            image_token_index=image_token_index,
            max_context=max_context,
            n_layers=0,  # no in-LLM pooling
            has_tokenizer=True,
        )
        self._bytes_per_token = _kv_bytes_per_token(config, dtype)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="squint-vllm", daemon=True)
        self._engine = None
        # By engine id: the client's request id can repeat (a retry, two clients), so each request is
        # also numbered here; the engine id is what vLLM and the books know it by.
        self._inflight: dict[str, tuple[asyncio.Task, ResponseSink]] = {}
        self._serial = itertools.count(1)
        self._tokens_in_flight: dict[str, int] = {}
        self._stopping = False
        self._lock = threading.Lock()

    # -- life cycle (the adapter's thread) --

    def start(self, engine: Any = None) -> None:
        """Start the event loop and load the engine; raises what loading raised. ``engine``: an
        object with ``AsyncLLM``'s ``generate`` and ``shutdown`` to serve with instead (tests)."""
        self._thread.start()
        if engine is None:
            asyncio.run_coroutine_threadsafe(self._create_engine(), self._loop).result()
        else:
            self._engine = engine
        asyncio.run_coroutine_threadsafe(self._watch_cancellations(), self._loop)

    async def _create_engine(self) -> None:
        if self._settings.device == "cpu":
            reserved = cpu_reserved_cores(self._settings.vllm_cpu_reserved_cores, os.cpu_count() or 1)
            if reserved is not None:
                # Read by vLLM's CPU worker when it binds its compute threads to cores.
                os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
        idle = idle_spin_seconds(self._settings)
        if idle is not None:
            # Read in each worker process vLLM spawns, by the extension engine_args names.
            os.environ[vllm_worker_idle.IDLE_SPIN_ENV] = str(idle)
        from vllm.v1.engine.async_llm import AsyncLLM

        self._engine = AsyncLLM.from_engine_args(
            engine_args(self._settings, self._language_model_dir), stat_loggers=self._stat_loggers or None
        )
        logger.info("vLLM serves %s (max_num_seqs %d)", self._language_model_dir, self._settings.max_batch)

    def stop(self, timeout: float = 10.0) -> None:
        """Fail every request in flight as shutting down, then stop the engine and the loop."""
        with self._lock:
            self._stopping = True
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop)
            try:
                future.result(timeout)
            except Exception:
                logger.warning("the vLLM engine did not stop cleanly within %.1f s", timeout, exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()
        # What holds metrics (the engine's stat loggers, ours) goes with the loop.
        self._engine = None
        self._stat_loggers = []
        self._metrics = NoMetrics()

    async def _shut_down(self) -> None:
        tasks = [task for task, _ in self._inflight.values() if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._engine is not None:
            self._engine.shutdown()
        # Then every other task on this loop (the cancellation watcher, vLLM's output handler): a
        # coroutine left pending is finalized at the stub's exit, after Triton has freed what its
        # frames still hold (the custom metrics), and the stub segfaults there.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    # -- requests (any thread) --

    def submit(self, request_id: str, inputs: Mapping[str, np.ndarray], sink: ResponseSink) -> None:
        """Start a request; a malformed one, or one that finds every place taken, is answered at once."""
        request = read_request(self.checks.prepare, inputs, self._settings.default_max_new_tokens, sink, request_id)
        if request is None:
            return
        limit = self._settings.max_batch + self._settings.max_queue
        engine_id = f"{request_id}#{next(self._serial)}"
        with self._lock:
            if self._stopping:
                refusal: SquintError | None = ModelNotReady("the LLM worker is shutting down")
            elif len(self._inflight) >= limit:
                refusal = WorkerBusy(
                    f"the LLM worker is busy and unavailable for new requests: {len(self._inflight)} are in "
                    f"flight (max_batch {self._settings.max_batch} + max_queue {self._settings.max_queue}); "
                    "retry later or on another instance"
                )
            else:
                refusal = None
                # Reserved now, so the limit holds across threads; the loop replaces it with the task.
                self._inflight[engine_id] = (None, sink)  # type: ignore[assignment]
        if refusal is not None:
            logger.info("request %s refused: %s", request_id, refusal.message)
            fail_quietly(sink, refusal, request_id)
            return
        self._loop.call_soon_threadsafe(self._begin, engine_id, request, sink)

    def _begin(self, engine_id: str, request: PreparedRequest, sink: ResponseSink) -> None:
        if self._stopping:  # admitted just before the stop: its task would outlive the engine
            self._retire(engine_id)
            fail_quietly(sink, ModelNotReady("the LLM worker is shutting down"), engine_id)
            return
        task = self._loop.create_task(self._generate(engine_id, request, sink))
        task.add_done_callback(functools.partial(self._ended, engine_id, sink))
        self._inflight[engine_id] = (task, sink)

    def _ended(self, engine_id: str, sink: ResponseSink, task: asyncio.Task) -> None:
        """A request's task is done: off the books, and answered if it was cancelled (its client
        left, or the worker stops). Here, not in the task: one cancelled before its first step runs
        none of its body, and would hold its place for good."""
        self._retire(engine_id)
        if not task.cancelled():
            return
        # vLLM's generate aborted the request in the engine as the cancellation went through it.
        if self._stopping:
            fail_quietly(sink, ModelNotReady("the LLM worker is shutting down"), engine_id)
            return
        try:
            sink.cancelled()
        except Exception:
            logger.debug("request %s: the cancelled response could not be sent", engine_id, exc_info=True)

    async def _generate(self, engine_id: str, request: PreparedRequest, sink: ResponseSink) -> None:
        """Serve one request; a cancellation goes through, to :meth:`_ended`."""
        engine = self._engine
        assert engine is not None
        try:
            with torch.inference_mode():
                embeds = prompt_embeddings(
                    self._embed_tokens, request.input_ids, request.visual_embeds, self._image_token_index
                )[0]  # [n_prompt, hidden]
            self._metrics.count_request(request.prompt_tokens, request.visual_tokens)
            self._tokens_in_flight[engine_id] = request.prompt_tokens
            self._report()
            params = sampling_params(request.sampling)
            # aclosing: leaving early (a sink that raised) closes vLLM's stream now, which aborts the request.
            outputs = engine.generate({"prompt_embeds": embeds}, params, engine_id)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    completion = output.outputs[0]
                    new = list(completion.token_ids)
                    if new:
                        for token_id in new:
                            sink.send_token(int(token_id))
                        self._metrics.count_generated(len(new))
                        self._tokens_in_flight[engine_id] += len(new)
                    if output.finished:
                        # Off the books before the final response: a client that reads the load
                        # gauges after its answer sees the request gone.
                        self._retire(engine_id)
                        sink.finish("length" if completion.finish_reason == "length" else "stop")
                        return
            raise SquintError(f"vLLM ended request {engine_id!r} without finishing it")
        except Exception as exc:
            error = _engine_error(exc, engine_id)
            logger.log(
                logging.INFO if isinstance(error, InvalidRequest) else logging.ERROR,
                "request %s: %s",
                engine_id,
                error.message,
                exc_info=not isinstance(error, InvalidRequest),
            )
            fail_quietly(sink, error, engine_id)

    def _retire(self, request_id: str) -> None:
        """Forget a request (once; a second call does nothing) and report the load without it."""
        known = request_id in self._inflight or request_id in self._tokens_in_flight
        self._inflight.pop(request_id, None)
        self._tokens_in_flight.pop(request_id, None)
        if known:
            self._report()

    async def _watch_cancellations(self) -> None:
        while True:
            await asyncio.sleep(_CANCEL_CHECK_S)
            for request_id, (task, sink) in list(self._inflight.items()):
                if task is not None and not task.done() and sink_cancelled(sink, request_id):
                    logger.info("request %s cancelled by its client", request_id)
                    task.cancel()

    def _report(self) -> None:
        active = len(self._tokens_in_flight)
        kv_bytes = sum(self._tokens_in_flight.values()) * self._bytes_per_token
        self._metrics.set_load(active, len(self._inflight) - active, kv_bytes)


def cpu_reserved_cores(setting: int, cores: int) -> int | None:
    """The cores vLLM's CPU worker keeps off its compute threads (``None``: vLLM's default, one).

    On a small machine the reserved core is a large share of the compute: on 2 cores a lone stream
    decodes about 1.3x faster with none reserved (41 against 31 tokens/s on the medium pack).
    """
    if setting >= 0:
        return setting
    return 0 if cores <= 4 else None


def idle_spin_seconds(settings: LLMWorkerSettings) -> float | None:
    """How long vLLM's worker polls for its next step after the last (``None``: vLLM's own, 1 s).

    On CPU the poll takes a core the vision worker shares: 0.1 s still covers the gap between two
    decode steps (tens of ms), so steps stay back to back under load.
    """
    if settings.vllm_idle_spin_seconds >= 0:
        return settings.vllm_idle_spin_seconds
    return CPU_IDLE_SPIN_SECONDS if settings.device == "cpu" else None


def _checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return dtype if isinstance(dtype, torch.dtype) else _TORCH_DTYPES[str(dtype)]


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _engine_error(exc: Exception, request_id: str) -> SquintError:
    if isinstance(exc, SquintError):
        return exc
    if type(exc).__name__ == "EngineDeadError":
        return ModelNotReady(f"the vLLM engine has stopped (request {request_id!r}); the worker must restart")
    if isinstance(exc, ValueError):  # vLLM's own checks of a request
        return InvalidRequest(str(exc).split("\n")[0])
    return internal_error(request_id)


__all__ = [
    "VLLMGenerationLoop",
    "cpu_reserved_cores",
    "engine_args",
    "idle_spin_seconds",
    "load_input_embeddings",
    "sampling_params",
]
