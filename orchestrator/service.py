"""The public GenerationService: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import contextlib
import dataclasses
import time

from orchestrator.core import Orchestrator
from orchestrator.types import (
    Chunk,
    Finished,
    GenerationRequest,
    ImageChunk,
    MediaUsage,
    Message,
    Sampling,
    TextChunk,
    TextDelta,
    Usage,
    VideoChunk,
)
from squint.common.v1 import types_pb2
from squint.errors import InvalidRequest
from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc as pb_grpc
from squint.rpc import client_identity, current_request_id
from squint.wire import params_of


def _checked_request_id(value: str) -> str:
    # It travels in gRPC metadata and log lines: printable ASCII, bounded.
    if len(value) > 128 or not all(32 <= ord(ch) < 127 for ch in value):
        raise InvalidRequest("request_id must be at most 128 printable ASCII characters")
    return value


def _chunks_from_proto(chunks, label: str) -> tuple[Chunk, ...]:
    out: list[Chunk] = []
    for index, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("kind")
        if kind == "text":
            out.append(TextChunk(chunk.text))
        elif kind == "image":
            out.append(ImageChunk(chunk.image.data))
        elif kind == "video":
            out.append(VideoChunk(chunk.video.data, chunk.video.max_frames, chunk.video.fps))
        else:
            raise InvalidRequest(f"{label}[{index}] is empty; set its text, image or video")
    return tuple(out)


def request_from_proto(message: pb.GenerateRequest, request_id: str) -> GenerationRequest:
    """The domain request; ``request_id`` is used when the message carries none."""
    if message.chunks and message.messages:
        raise InvalidRequest("set chunks (one user turn) or messages (a conversation), not both")
    messages = tuple(
        Message(m.role, _chunks_from_proto(m.content, f"messages[{i}].content")) for i, m in enumerate(message.messages)
    )
    chunks = tuple(c for m in messages for c in m.chunks) if messages else _chunks_from_proto(message.chunks, "chunks")
    s = message.sampling
    return GenerationRequest(
        chunks=chunks,
        messages=messages,
        request_id=_checked_request_id(message.request_id) or request_id,
        visual_token_budget=message.visual_token_budget,
        compressor=message.compressor.name,
        compressor_params=params_of(message.compressor),
        sampling=Sampling(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            repetition_penalty=s.repetition_penalty,
        ),
        system_prompt=message.system_prompt,
        return_coverage=message.return_coverage,
        allocation_policy=message.allocation_policy,
        dedup_threshold=message.dedup_threshold if message.HasField("dedup_threshold") else None,
        pixel_dedup_threshold=(message.pixel_dedup_threshold if message.HasField("pixel_dedup_threshold") else None),
        context_limit=message.context_limit,
    )


def media_usage_to_proto(m: MediaUsage) -> pb.MediaUsage:
    """The one conversion of an image's or frame's accounting to the public API."""
    return pb.MediaUsage(
        chunk_index=m.chunk_index,
        kind=m.kind,
        tokens_before=m.tokens_before,
        tokens_after=m.tokens_after,
        compressor=m.compressor,
        cache_hit=m.cache_hit,
        cache_key=m.cache_key,
        encode_ms=m.encode_ms,
        worker=m.worker,
        grid_height=m.grid[0],
        grid_width=m.grid[1],
        complexity=m.complexity,
        coverage=[types_pb2.TokenCoverage(patches=list(c)) for c in m.coverage],
        allocated_tokens=m.allocated_tokens,
        duplicate_of=m.duplicate_of,
        timestamp_seconds=m.timestamp,
        features_cached=m.features_cached,
        skipped_before_clip=m.skipped_before_clip,
    )


def usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        visual_tokens=usage.visual_tokens,
        visual_token_budget=usage.visual_token_budget,
        media=[media_usage_to_proto(m) for m in usage.media],
        timings=pb.Timings(
            encode_ms=usage.timings.encode_ms,
            time_to_first_token_ms=usage.timings.time_to_first_token_ms,
            total_ms=usage.timings.total_ms,
        ),
        allocation_policy=usage.allocation_policy,
        frames=pb.FrameCounts(sampled=usage.frames.sampled, analysed=usage.frames.analysed, kept=usage.frames.kept),
    )


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orchestrator = orchestrator

    def _request(self, message: pb.GenerateRequest, context) -> GenerationRequest:
        request = request_from_proto(message, current_request_id.get())
        current_request_id.set(request.request_id)  # errors are logged under the client's id
        remaining = context.time_remaining()
        return dataclasses.replace(
            request,
            client=client_identity(context),
            deadline=None if remaining is None else time.monotonic() + remaining,
        )

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        domain = self._request(request, context)
        text: list[str] = []
        token_ids: list[int] = []
        # aclosing: the core's stream (its Triton request and its client's slot) ends with this call.
        async with contextlib.aclosing(self._orchestrator.generate(domain)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    text.append(event.text)
                    token_ids.extend(event.token_ids)
                elif isinstance(event, Finished):
                    return pb.GenerateResponse(
                        request_id=domain.request_id,
                        text="".join(text),
                        token_ids=token_ids,
                        finish_reason=event.finish_reason,
                        usage=usage_to_proto(event.usage),
                    )
        raise RuntimeError("generation ended without a final event")

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        domain = self._request(request, context)
        async with contextlib.aclosing(self._orchestrator.generate(domain)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield pb.GenerateStreamResponse(
                        request_id=domain.request_id, text=event.text, token_ids=event.token_ids
                    )
                elif isinstance(event, Finished):
                    yield pb.GenerateStreamResponse(
                        request_id=domain.request_id,
                        finish_reason=event.finish_reason,
                        usage=usage_to_proto(event.usage),
                    )
