"""The orchestrator's client of the LLM worker on Triton (KServe v2 gRPC, streaming)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from llm_worker import INVALID_REQUEST_PREFIX, STAGED_MODEL_NAME
from llm_worker.spans import ImageSpan, span_tensors
from llm_worker.text_tensors import finish_reason, stop_tensor
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.types import Sampling
from squint.errors import DeadlineExceeded, InvalidRequest, Unsupported, UpstreamUnavailable
from squint.rpc import ClientTlsSettings, call_timeout, channel_options

logger = logging.getLogger(__name__)

_NUMPY_OF_TRITON = {"FP32": np.float32, "FP16": np.float16}
_TRITON_OF_NUMPY = {np.dtype(np.int64): "INT64", np.dtype(np.bool_): "BOOL"}


@dataclass(frozen=True)
class LLMRequest:
    input_ids: np.ndarray  # [n_prompt] int64, one placeholder per visual token
    visual_embeds: np.ndarray | None  # [n_visual, llm_hidden] in prompt order
    sampling: Sampling  # already resolved: max_new_tokens > 0
    request_id: str
    image_spans: tuple[ImageSpan, ...] = ()  # the images pooled inside the LLM, each as its compressor asked
    deadline: float | None = None  # time.monotonic() at which the client stops waiting


@dataclass(frozen=True)
class LLMStep:
    token_ids: tuple[int, ...]
    finish_reason: str  # "" until the last step


def _input(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def wire_bytes(tensor: triton_grpc.InferInput) -> int:
    """Bytes of a tensor's content in the request (what KServe carries in ``raw_input_contents``)."""
    return len(tensor._get_content() or b"")  # tritonclient's accessor for the serialized content


class TritonLLMClient:
    """Streams generated tokens from the LLM worker: ``model_name`` (vLLM) serves every request
    but those that pool inside the LLM (image spans), which go to ``staged_model_name``."""

    def __init__(
        self,
        url: str,
        model_name: str,
        max_message_bytes: int,
        timeout_seconds: float,
        tls: ClientTlsSettings = ClientTlsSettings(),
        metrics: OrchestratorMetrics | None = None,
        staged_model_name: str = STAGED_MODEL_NAME,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.staged_model_name = staged_model_name
        self._metrics = metrics
        self._timeout = timeout_seconds
        options = channel_options(max_message_bytes)
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        # tritonclient takes the PEM files' paths itself.
        self._client = triton_aio.InferenceServerClient(
            url,
            ssl=tls.enabled,
            root_certificates=tls.ca_file or None,
            private_key=tls.key_file or None,
            certificate_chain=tls.cert_file or None,
            channel_args=options,
        )
        self._visual_dtypes: dict[str, np.dtype] = {}

    def model_for(self, request: LLMRequest) -> str:
        """The Triton model that serves ``request``: the staged engine when it pools inside the LLM."""
        return self.staged_model_name if request.image_spans else self.model_name

    async def visual_dtype(self, deadline: float | None = None, model: str | None = None) -> np.dtype:
        """The dtype the model's ``visual_embeds`` input declares (float32 on CPU, float16 on GPU)."""
        model = model or self.model_name
        if model not in self._visual_dtypes:
            timeout = call_timeout(self._timeout, deadline, "the LLM worker was asked for its model metadata")
            try:
                metadata = await self._client.get_model_metadata(model, as_json=True, client_timeout=timeout)
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                    raise DeadlineExceeded(f"the LLM worker at {self.url} did not answer before the deadline") from None
                raise await self._missing_model(exc, model) or UpstreamUnavailable(
                    f"the LLM worker at {self.url} is unavailable: {exc.message()}"
                ) from None
            datatype = next(i["datatype"] for i in metadata["inputs"] if i["name"] == "visual_embeds")
            self._visual_dtypes[model] = np.dtype(_NUMPY_OF_TRITON[datatype])
        return self._visual_dtypes[model]

    async def _missing_model(self, error: InferenceServerException, model: str) -> Unsupported | None:
        """An error saying the deployment lacks ``model``, when that is what Triton meant: the model
        is unknown while the server is ready. (A server that is stopping unloads its models and
        says the same of them; that is UNAVAILABLE, not a deployment without the model.)"""
        message = (error.message() or "").lower()
        if "unknown model" not in message and "not found" not in message:
            return None
        try:
            ready = await self._client.is_server_ready(client_timeout=2.0)
        except InferenceServerException:
            ready = False
        if not ready:
            return None
        if model == self.staged_model_name:
            needs = "in-LLM pooling (image spans: staged_pool with layer >= 0)"
        else:
            needs = "every request without in-LLM pooling"
        return Unsupported(
            f"the LLM worker at {self.url} does not serve the model {model!r}, which {needs} needs; "
            f"load it in Triton beside the others (the chart's llm.triton.models, or tritonserver --load-model)"
        )

    async def _inputs(self, request: LLMRequest) -> list[triton_grpc.InferInput]:
        s = request.sampling
        inputs = [
            _input("input_ids", request.input_ids.astype(np.int64), "INT64"),
            _input("max_new_tokens", np.array([s.max_new_tokens], dtype=np.int32), "INT32"),
            _input("temperature", np.array([s.temperature], dtype=np.float32), "FP32"),
        ]
        if request.visual_embeds is not None and len(request.visual_embeds):
            dtype = await self.visual_dtype(request.deadline, self.model_for(request))
            datatype = "FP16" if dtype == np.float16 else "FP32"
            inputs.append(_input("visual_embeds", request.visual_embeds.astype(dtype, copy=False), datatype))
        if s.top_p:
            inputs.append(_input("top_p", np.array([s.top_p], dtype=np.float32), "FP32"))
        if s.top_k:
            inputs.append(_input("top_k", np.array([s.top_k], dtype=np.int32), "INT32"))
        if s.seed:
            inputs.append(_input("seed", np.array([s.seed], dtype=np.uint64), "UINT64"))
        if s.repetition_penalty:
            inputs.append(_input("repetition_penalty", np.array([s.repetition_penalty], dtype=np.float32), "FP32"))
        if s.stop_token_ids:
            inputs.append(_input("stop_token_ids", np.array(s.stop_token_ids, dtype=np.int64), "INT64"))
        if s.stop:
            inputs.append(_input("stop", stop_tensor(s.stop), "UINT8"))
        for name, array in span_tensors(request.image_spans).items():
            inputs.append(_input(name, array, _TRITON_OF_NUMPY[array.dtype]))
        return inputs

    async def generate(self, request: LLMRequest) -> AsyncIterator[LLMStep]:
        """Yield the generated tokens as Triton streams them; the last step has a finish reason."""
        model = self.model_for(request)
        inputs = await self._inputs(request)
        if self._metrics is not None:
            self._metrics.record_triton_request({tensor.name(): wire_bytes(tensor) for tensor in inputs})

        async def requests():
            yield {
                "model_name": model,
                "inputs": inputs,
                "outputs": [
                    triton_grpc.InferRequestedOutput("token_ids"),
                    triton_grpc.InferRequestedOutput("finish_reason"),
                ],
                "request_id": request.request_id,
            }

        # The stream ends at the client's deadline; ending it (here, or by stream.cancel() when the
        # caller goes away) cancels the request in the LLM worker, which frees its batch slot.
        timeout = call_timeout(self._timeout, request.deadline, "generation started")
        stream = self._client.stream_infer(inputs_iterator=requests(), stream_timeout=timeout)
        try:
            async for result, error in stream:
                if error is not None:
                    raise await self._missing_model(error, model) or _llm_error(error, self.url)
                token_ids = tuple(int(t) for t in result.as_numpy("token_ids").reshape(-1))
                finish = finish_reason(result.as_numpy("finish_reason"))
                yield LLMStep(token_ids=token_ids, finish_reason=finish)
                if finish:
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"the LLM worker at {self.url} did not finish before the deadline") from None
            raise UpstreamUnavailable(f"the LLM worker at {self.url} is unavailable: {exc.details()}") from None
        except InferenceServerException as exc:
            raise await self._missing_model(exc, model) or _llm_error(exc, self.url) from None
        finally:
            stream.cancel()
        raise UpstreamUnavailable(f"the LLM worker at {self.url} ended the stream without finishing")

    async def is_ready(self, timeout: float = 2.0) -> bool:
        """Whether the worker says it is ready (Triton's ServerReady: live, every model loaded)."""
        try:
            return bool(await self._client.is_server_ready(client_timeout=timeout))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self._client.close()


# What Triton says when it cannot take a request now but will (or another replica can): down,
# starting, or stopping (while it drains on SIGTERM its models have "no available versions").
_UNAVAILABLE_MESSAGES = (
    "unavailable",
    "not ready",
    "failed to connect",
    "has no available versions",
    "server is stopping",
)


def _llm_error(error: InferenceServerException, url: str) -> Exception:
    message = error.message() if hasattr(error, "message") else str(error)
    lowered = message.lower()
    if any(phrase in lowered for phrase in _UNAVAILABLE_MESSAGES):
        return UpstreamUnavailable(f"the LLM worker at {url} is unavailable: {message}")
    if message.startswith(INVALID_REQUEST_PREFIX):
        # What the orchestrator cannot check itself (e.g. a pooling layer beyond the LLM's depth).
        return InvalidRequest(f"the LLM refused the request: {message.removeprefix(INVALID_REQUEST_PREFIX)}")
    # The orchestrator validated the request; anything else is our fault, reported as internal.
    return RuntimeError(f"the LLM worker at {url} failed: {message}")
