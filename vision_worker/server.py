"""Run the vision worker: bind, report NOT_SERVING, load the pack, warm up, then SERVING."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from compressor_plugins.registry import load_compressors
from squint.errors import ModelNotReady
from squint.metrics import serve_metrics
from squint.packs import load_pack, reading
from squint.rpc import ServingServer, create_server, serve_until_signalled
from squint.vision.v1 import vision_worker_pb2 as pb
from squint.vision.v1 import vision_worker_pb2_grpc as pb_grpc
from vision_worker.cache import create_cache
from vision_worker.encoder import VisionEncoder
from vision_worker.models import VisionModels
from vision_worker.service import VisionWorkerServicer
from vision_worker.settings import VisionWorkerSettings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionWorker"].full_name


def build_encoder(settings: VisionWorkerSettings) -> VisionEncoder:
    """Load plugins, the pack's models and the cache: everything that can fail at start-up."""
    registry = load_compressors(settings.plugins)
    pack = load_pack(settings.pack_dir)
    with reading(pack, f"CLIP ({pack.clip_dir}) and the projector ({pack.llava_dir})"):
        models = VisionModels(pack, device=settings.device, dtype=settings.dtype)
    return VisionEncoder(
        models,
        registry,
        create_cache(settings.cache),
        settings.limits,
        default_compressor=settings.default_compressor,
        cache_key_prefix=settings.cache.key_prefix,
        feature_memory_bytes=settings.cache.features_memory_bytes,
        cache_hidden_states=settings.cache.features_include_hidden_states,
        batching=settings.batching,
    )


async def start(
    settings: VisionWorkerSettings, port_file: Path | None = None, metrics_port_file: Path | None = None
) -> tuple[ServingServer, VisionEncoder]:
    """Start a vision worker in this event loop and return once it is SERVING.

    The bound port is written to ``port_file`` as soon as the server listens, before the
    models load, so a supervisor can watch the health service go from NOT_SERVING to SERVING.
    """
    holder: dict[str, VisionWorkerServicer] = {}

    def add(server) -> list[str]:
        # The servicer is registered now and given its encoder once models are loaded.
        holder["servicer"] = _LateServicer()
        pb_grpc.add_VisionWorkerServicer_to_server(holder["servicer"], server)
        return [SERVICE_NAME]

    serving = create_server(settings.grpc, "vision-worker", add)
    async with serving.starting():
        if port_file is not None:
            port_file.write_text(str(serving.port))
        logger.info("vision worker listening on %s; loading pack %s", serving.address, settings.pack_dir)
        encoder = await asyncio.to_thread(build_encoder, settings)
        await asyncio.to_thread(encoder.warm_up)
        serve_metrics(settings.metrics, encoder.metrics.registry, metrics_port_file)
        holder["servicer"].ready(VisionWorkerServicer(encoder, settings.worker_name or serving.address))
        await serving.set_serving(True)
    logger.info(
        "vision worker serving on %s (pack %s, compressors %s, cache %s)",
        serving.address,
        encoder.models.pack.id,
        ", ".join(encoder.registry.names()),
        encoder.cache.description,
    )
    return serving, encoder


class _LateServicer(pb_grpc.VisionWorkerServicer):
    """Answers UNAVAILABLE until the models are loaded, then delegates."""

    def __init__(self) -> None:
        self._inner: VisionWorkerServicer | None = None

    def ready(self, inner: VisionWorkerServicer) -> None:
        self._inner = inner

    def _get(self) -> VisionWorkerServicer:
        if self._inner is None:
            raise ModelNotReady("the vision worker is still loading its models")
        return self._inner

    async def Analyze(self, request, context):
        return await self._get().Analyze(request, context)

    async def Encode(self, request, context):
        return await self._get().Encode(request, context)

    async def ListCompressors(self, request, context):
        return await self._get().ListCompressors(request, context)

    async def Smallest(self, request, context):
        return await self._get().Smallest(request, context)


async def serve(
    settings: VisionWorkerSettings, port_file: Path | None = None, metrics_port_file: Path | None = None
) -> None:
    serving, encoder = await start(settings, port_file, metrics_port_file)
    await serve_until_signalled(serving, on_stop=encoder.close)
