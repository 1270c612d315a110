"""The VisionWorker gRPC servicer: protobuf in, domain objects to the core, protobuf out."""

from __future__ import annotations

import json

from compressor_plugins.registry import describe
from squint import tensors
from squint.common.v1 import types_pb2
from squint.vision.v1 import vision_worker_pb2 as pb
from squint.vision.v1 import vision_worker_pb2_grpc as pb_grpc
from squint.wire import params_of
from vision_worker.encoder import EncodedItem, EncodeItem, VisionEncoder


def encoded_image_to_proto(e: EncodedItem, with_coverage: bool) -> pb.EncodedImage:
    """The one conversion of an encoded item to the wire; its coverage only when the item asked."""
    message = pb.EncodedImage(
        tokens=pb.VisualTokens(inline=tensors.to_proto(e.tokens)),
        tokens_before=e.tokens_before,
        tokens_after=e.tokens_after,
        cache_hit=e.cache_hit,
        cache_key=e.cache_key,
        encode_ms=e.encode_ms,
        compressor=e.compressor,
        content_hash=e.content_hash,
        grid_height=e.grid[0],
        grid_width=e.grid[1],
        complexity=e.complexity,
    )
    if with_coverage:
        message.coverage.extend(types_pb2.TokenCoverage(patches=list(c)) for c in e.covers)
    if e.directive is not None:
        message.directive.CopyFrom(
            types_pb2.InLLMDirective(
                layer=e.directive.layer,
                stride=e.directive.stride,
                shape=e.directive.shape,
                reference_mode=e.directive.reference_mode,
            )
        )
    return message


class VisionWorkerServicer(pb_grpc.VisionWorkerServicer):
    def __init__(self, encoder: VisionEncoder, worker_name: str) -> None:
        self._encoder = encoder
        self._worker_name = worker_name

    async def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        labels = list(request.labels)
        params = params_of(request.compressor)
        analyses = await self._encoder.analyze(
            [
                EncodeItem(
                    data=image.data,
                    compressor=request.compressor.name,
                    params=params,
                    question=request.question,
                    label=labels[index] if index < len(labels) else "",
                )
                for index, image in enumerate(request.images)
            ]
        )
        return pb.AnalyzeResponse(
            worker=self._worker_name,
            images=[
                pb.ImageAnalysis(
                    grid_height=a.grid[0],
                    grid_width=a.grid[1],
                    tokens_before=a.tokens_before,
                    predicted_tokens=a.natural_tokens,
                    levels=a.levels,
                    complexity=a.complexity,
                    descriptor=tensors.to_proto(a.descriptor),
                    content_hash=a.content_hash,
                    features_cached=a.features_cached,
                )
                for a in analyses
            ],
        )

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        items = [
            EncodeItem(
                data=item.image.data,
                compressor=item.compressor.name,
                params=params_of(item.compressor),
                question=item.question,
                max_tokens=item.max_tokens,
                label=item.label,
            )
            for item in request.items
        ]
        encoded = await self._encoder.encode(items)
        return pb.EncodeResponse(
            worker=self._worker_name,
            images=[
                encoded_image_to_proto(e, item.return_coverage) for e, item in zip(encoded, request.items, strict=True)
            ],
        )

    async def Smallest(self, request: pb.SmallestRequest, context) -> pb.SmallestResponse:
        tokens = self._encoder.smallest(request.compressor.name, params_of(request.compressor))
        grid = self._encoder.models.grid
        return pb.SmallestResponse(tokens=tokens, grid_height=grid[0], grid_width=grid[1])

    async def ListCompressors(self, request: pb.ListCompressorsRequest, context) -> pb.ListCompressorsResponse:
        return pb.ListCompressorsResponse(
            compressors=[
                pb.CompressorInfo(
                    name=info["name"],
                    summary=info["summary"],
                    output_space=info["output_space"],
                    distribution=info["distribution"],
                    version=info["version"],
                    parameters=[
                        pb.CompressorParameter(
                            name=p["name"],
                            type=p["type"],
                            default_json=json.dumps(p["default"]),
                            minimum_json="" if p["minimum"] is None else json.dumps(p["minimum"]),
                            maximum_json="" if p["maximum"] is None else json.dumps(p["maximum"]),
                            choices=p["choices"],
                            description=p["description"],
                        )
                        for p in info["params"]
                    ],
                )
                for info in describe(self._encoder.registry)
            ]
        )
