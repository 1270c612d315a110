"""The orchestrator's client of the vision worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np

from orchestrator.visual_tokens import VisualTokens
from squint import tensors
from squint.rpc import (
    REQUEST_ID_METADATA,
    ClientTlsSettings,
    call_timeout,
    channel_options,
    client_channel,
    error_from_rpc,
)
from squint.vision.v1 import vision_worker_pb2 as pb
from squint.vision.v1 import vision_worker_pb2_grpc as pb_grpc
from squint.wire import compressor_spec


@dataclass(frozen=True)
class ImageToEncode:
    data: bytes
    label: str  # e.g. "chunks[2].image", how errors name it to the client
    max_tokens: int = 0
    return_coverage: bool = False


@dataclass(frozen=True)
class EncodedMedia:
    tokens: VisualTokens
    tokens_before: int
    tokens_after: int
    cache_hit: bool
    cache_key: str
    encode_ms: float
    compressor: str
    worker: str
    grid: tuple[int, int] = (0, 0)
    complexity: float | None = None
    coverage: tuple[tuple[int, ...], ...] = ()
    # (layer, stride, shape, reference_mode) when the compressor asks for pooling inside the LLM
    directive: tuple[int, int, str, bool] | None = None


@dataclass(frozen=True)
class MediaAnalysis:
    """What one image costs, from the worker that ran CLIP on it (and keeps its features)."""

    natural_tokens: int
    levels: tuple[int, ...]
    complexity: float | None
    descriptor: np.ndarray  # [d] unit-norm
    tokens_before: int
    grid: tuple[int, int]
    features_cached: bool
    worker: str


class VisionClient:
    """Calls one vision worker; statuses come back as domain errors."""

    def __init__(
        self, target: str, max_message_bytes: int, timeout_seconds: float, tls: ClientTlsSettings = ClientTlsSettings()
    ) -> None:
        self.target = target
        self._timeout = timeout_seconds
        self._channel = client_channel(target, tls, channel_options(max_message_bytes))
        self._stub = pb_grpc.VisionWorkerStub(self._channel)

    async def analyze(
        self,
        images: Sequence[ImageToEncode],
        compressor: str,
        params: dict[str, Any],
        question: str,
        request_id: str,
        deadline: float | None = None,
    ) -> list[MediaAnalysis]:
        request = pb.AnalyzeRequest(
            images=[pb.ImageInput(data=image.data) for image in images],
            labels=[image.label for image in images],
            compressor=compressor_spec(compressor, params),
            question=question,
            request_id=request_id,
        )
        reply = await self._call(self._stub.Analyze, request, request_id, deadline)
        return [
            MediaAnalysis(
                natural_tokens=item.predicted_tokens,
                levels=tuple(item.levels) or (item.predicted_tokens,),
                complexity=item.complexity if item.HasField("complexity") else None,
                descriptor=tensors.from_proto(item.descriptor, f"{image.label}.descriptor"),
                tokens_before=item.tokens_before,
                grid=(item.grid_height, item.grid_width),
                features_cached=item.features_cached,
                worker=reply.worker,
            )
            for image, item in zip(images, reply.images, strict=True)
        ]

    async def encode(
        self,
        images: Sequence[ImageToEncode],
        compressor: str,
        params: dict[str, Any],
        question: str,
        request_id: str,
        deadline: float | None = None,
    ) -> list[EncodedMedia]:
        spec = compressor_spec(compressor, params)
        request = pb.EncodeRequest(
            request_id=request_id,
            items=[
                pb.EncodeItem(
                    image=pb.ImageInput(data=image.data),
                    compressor=spec,
                    question=question,
                    max_tokens=image.max_tokens,
                    label=image.label,
                    return_coverage=image.return_coverage,
                )
                for image in images
            ],
        )
        reply = await self._call(self._stub.Encode, request, request_id, deadline)
        return [
            EncodedMedia(
                tokens=VisualTokens.from_reply(item.tokens, image.label),
                tokens_before=item.tokens_before,
                tokens_after=item.tokens_after,
                cache_hit=item.cache_hit,
                cache_key=item.cache_key,
                encode_ms=item.encode_ms,
                compressor=item.compressor,
                worker=reply.worker,
                grid=(item.grid_height, item.grid_width),
                complexity=item.complexity if item.HasField("complexity") else None,
                coverage=tuple(tuple(c.patches) for c in item.coverage),
                directive=(
                    item.directive.layer,
                    item.directive.stride,
                    item.directive.shape,
                    item.directive.reference_mode,
                )
                if item.HasField("directive")
                else None,
            )
            for image, item in zip(images, reply.images, strict=True)
        ]

    async def _call(self, method, request, request_id: str, deadline: float | None = None):
        """One RPC with the request id, and the client's deadline when it comes before the
        configured timeout; a failing status becomes its domain error."""
        timeout = call_timeout(self._timeout, deadline, f"vision worker {self.target} was called")
        try:
            return await method(request, timeout=timeout, metadata=((REQUEST_ID_METADATA, request_id),))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"vision worker {self.target}") from None

    async def close(self) -> None:
        await self._channel.close()
