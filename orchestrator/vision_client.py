"""The orchestrator's client of the vision worker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np

from compressor_plugins.protocol import LLMDirective
from orchestrator.visual_tokens import VisualTokens
from squint import tensors
from squint.common.v1 import types_pb2
from squint.errors import Unsupported
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
class VisionContext:
    """What every vision-worker call of one request shares: built once per request."""

    compressor: str  # registered name; empty: the worker's default
    params: Mapping[str, Any]  # as the client sent them; each worker resolves them against the compressor
    question: str  # the user's text, for text-guided compressors
    request_id: str  # correlates log lines across services
    deadline: float | None = None  # time.monotonic() at which the client stops waiting; None: it set none

    def compressor_spec(self) -> types_pb2.CompressorSpec:
        return compressor_spec(self.compressor, dict(self.params))


@dataclass(frozen=True)
class ImageToEncode:
    data: bytes
    label: str  # e.g. "chunks[2].image", how errors name it to the client
    max_tokens: int = 0
    return_coverage: bool = False


@dataclass(frozen=True)
class EncodedMedia:
    """One image's compressed tokens as the orchestrator holds them: ``pb.EncodedImage``'s side
    here (:func:`encoded_media_from_proto`), with the worker that encoded it."""

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
    directive: LLMDirective | None = None  # set when the compressor asks for pooling inside the LLM


def encoded_media_from_proto(message: pb.EncodedImage, worker: str, label: str) -> EncodedMedia:
    """The one conversion of an ``EncodedImage`` (the vision worker's reply) to the orchestrator's record."""
    directive = None
    if message.HasField("directive"):
        d = message.directive
        directive = LLMDirective(layer=d.layer, stride=d.stride, shape=d.shape, reference_mode=d.reference_mode)
    return EncodedMedia(
        tokens=VisualTokens.from_reply(message.tokens, label),
        tokens_before=message.tokens_before,
        tokens_after=message.tokens_after,
        cache_hit=message.cache_hit,
        cache_key=message.cache_key,
        encode_ms=message.encode_ms,
        compressor=message.compressor,
        worker=worker,
        grid=(message.grid_height, message.grid_width),
        complexity=message.complexity if message.HasField("complexity") else None,
        coverage=tuple(tuple(c.patches) for c in message.coverage),
        directive=directive,
    )


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


@dataclass(frozen=True)
class CompressorSummary:
    """A compressor a vision worker runs, as a client picking one needs it."""

    name: str
    summary: str
    output_space: str
    distribution: str


class VisionClient:
    """Calls one vision worker; statuses come back as domain errors."""

    def __init__(
        self, target: str, max_message_bytes: int, timeout_seconds: float, tls: ClientTlsSettings = ClientTlsSettings()
    ) -> None:
        self.target = target
        self._timeout = timeout_seconds
        self._channel = client_channel(target, tls, channel_options(max_message_bytes))
        self._stub = pb_grpc.VisionWorkerStub(self._channel)

    async def analyze(self, images: Sequence[ImageToEncode], context: VisionContext) -> list[MediaAnalysis]:
        request = pb.AnalyzeRequest(
            images=[pb.ImageInput(data=image.data) for image in images],
            labels=[image.label for image in images],
            compressor=context.compressor_spec(),
            question=context.question,
            request_id=context.request_id,
        )
        reply = await self._call(self._stub.Analyze, request, context)
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

    async def encode(self, images: Sequence[ImageToEncode], context: VisionContext) -> list[EncodedMedia]:
        spec = context.compressor_spec()
        request = pb.EncodeRequest(
            request_id=context.request_id,
            items=[
                pb.EncodeItem(
                    image=pb.ImageInput(data=image.data),
                    compressor=spec,
                    question=context.question,
                    max_tokens=image.max_tokens,
                    label=image.label,
                    return_coverage=image.return_coverage,
                )
                for image in images
            ],
        )
        reply = await self._call(self._stub.Encode, request, context)
        return [
            encoded_media_from_proto(item, reply.worker, image.label)
            for image, item in zip(images, reply.images, strict=True)
        ]

    async def list_compressors(self, context: VisionContext) -> list[CompressorSummary]:
        reply = await self._call(self._stub.ListCompressors, pb.ListCompressorsRequest(), context)
        return [CompressorSummary(c.name, c.summary, c.output_space, c.distribution) for c in reply.compressors]

    async def smallest(self, context: VisionContext) -> int:
        """The fewest tokens any image can be held to under the request's compressor setting (0: unknown)."""
        request = pb.SmallestRequest(compressor=context.compressor_spec(), request_id=context.request_id)
        try:
            return (await self._call(self._stub.Smallest, request, context)).tokens
        except Unsupported:
            return 0  # a worker from before the call existed (a rolling upgrade): Analyze will tell

    async def _call(self, method, request, context: VisionContext):
        """One RPC with the request id, and the client's deadline when it comes before the
        configured timeout; a failing status becomes its domain error."""
        timeout = call_timeout(self._timeout, context.deadline, f"vision worker {self.target} was called")
        try:
            return await method(request, timeout=timeout, metadata=((REQUEST_ID_METADATA, context.request_id),))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, f"vision worker {self.target}") from None

    async def close(self) -> None:
        await self._channel.close()
