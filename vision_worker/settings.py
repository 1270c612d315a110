"""The vision worker's settings: one object, built once from the environment and the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from compressor_plugins.registry import PluginSettings
from squint.config import load_settings
from squint.metrics import MetricsSettings
from squint.rpc import GrpcServerSettings
from vision_worker.batching import BatchingSettings
from vision_worker.cache import CacheSettings
from vision_worker.images import ImageLimits

ENV_PREFIX = "SQUINT_VISION_"
DEFAULT_PORT = 50061


@dataclass(frozen=True)
class VisionWorkerSettings:
    """Everything the vision worker process reads. Env: ``SQUINT_VISION_<FIELD>``."""

    pack_dir: Path = field(default=Path("pack"), metadata={"help": "model pack folder (squint-pack.json)"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda or cuda:N"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (checkpoint dtype on GPU, float32 on CPU), float32, float16"}
    )
    default_compressor: str = field(default="none", metadata={"help": "compressor used when a request names none"})
    worker_name: str = field(default="", metadata={"help": "how replies name this worker; host:port when empty"})
    # Requests come from the orchestrator in batches of at most 32 MiB of images.
    grpc: GrpcServerSettings = field(
        default_factory=lambda: GrpcServerSettings(port=DEFAULT_PORT, max_receive_message_bytes=64 * 1024 * 1024)
    )
    limits: ImageLimits = field(default_factory=ImageLimits)
    cache: CacheSettings = field(default_factory=CacheSettings)
    plugins: PluginSettings = field(default_factory=PluginSettings)
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings(port=9465))
    batching: BatchingSettings = field(default_factory=BatchingSettings)


def vision_settings(env=None, overrides=None) -> VisionWorkerSettings:
    return load_settings(VisionWorkerSettings, ENV_PREFIX, env, overrides)
