"""The orchestrator's settings: one object, built once from the environment and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.budget import DEFAULT_FLOOR_SHARE, POLICIES
from orchestrator.discovery import DiscoverySettings
from orchestrator.fetch import FetchSettings
from orchestrator.video import FrameSampling, VideoLimits
from squint.config import SettingsError, load_settings
from squint.metrics import MetricsSettings
from squint.rpc import AuthSettings, ClientTlsSettings, GrpcServerSettings

ENV_PREFIX = "SQUINT_ORCHESTRATOR_"
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class RequestLimits:
    """What one public request may ask for."""

    max_chunks: int = field(default=256, metadata={"help": "most chunks in a request"})
    max_media_items: int = field(default=64, metadata={"help": "most images and sampled frames in a request"})
    max_text_chars: int = field(default=64_000, metadata={"help": "most characters of text, summed over chunks"})
    max_image_bytes: int = field(
        default=20 * 1024 * 1024,
        metadata={"help": "largest image file, checked before it is sent on (the vision worker also checks its own)"},
    )
    max_new_tokens: int = field(default=2048, metadata={"help": "largest sampling.max_new_tokens accepted"})
    default_max_new_tokens: int = field(default=128, metadata={"help": "sampling.max_new_tokens when 0"})
    max_stop_strings: int = field(default=16, metadata={"help": "most sampling.stop strings"})
    max_stop_chars: int = field(default=256, metadata={"help": "longest sampling.stop string"})
    max_stop_token_ids: int = field(default=64, metadata={"help": "most sampling.stop_token_ids"})
    max_prompt_tokens: int = field(
        default=8192,
        metadata={
            "help": "most prompt tokens after the chat template, "
            "visual tokens included (the model's context also applies)"
        },
    )
    max_streams_per_client: int = field(
        default=128,
        metadata={
            "help": "most Generate and GenerateStream calls one client has in flight (by its token when tokens are "
            "configured, else by its address); more are refused with RESOURCE_EXHAUSTED; 0: no limit"
        },
    )


@dataclass(frozen=True)
class HttpSettings:
    """The OpenAI-compatible HTTP API, served beside the gRPC API by the same process."""

    enabled: bool = field(default=False, metadata={"help": "serve /v1/chat/completions, /v1/models and /health"})
    host: str = field(default="127.0.0.1", metadata={"help": "address the HTTP API listens on; 0.0.0.0 in a pod"})
    port: int = field(default=8080, metadata={"help": "HTTP port (0: a free one)"})
    served_model_name: str = field(
        default="", metadata={"help": "the model name clients send and /v1/models lists; empty: the pack's name"}
    )
    detail_low_tokens: int = field(
        default=64,
        metadata={"help": 'most visual tokens of an image_url with detail "low" (high and auto: the budget)'},
    )
    fetch: FetchSettings = field(default_factory=FetchSettings)
    playground: bool = field(
        default=True,
        metadata={"help": "serve the playground page at / (compare what compressors keep of a picture); off: / is 404"},
    )
    playground_examples: str = field(
        default="",
        metadata={"help": "folder of example pictures the playground offers; empty: the pack's examples/ when present"},
    )


@dataclass(frozen=True)
class OrchestratorSettings:
    """Everything the orchestrator process reads. Env: ``SQUINT_ORCHESTRATOR_<FIELD>``."""

    pack_dir: Path = field(
        default=Path("pack"), metadata={"help": "model pack folder (its tokenizer and chat template)"}
    )
    triton_url: str = field(
        default="127.0.0.1:8001",
        metadata={
            "help": "Triton gRPC address, host:port: the one LLM worker when llm_discovery is static and lists none"
        },
    )
    triton_model: str = field(
        default="squint_llm",
        metadata={"help": "the LLM worker's model in Triton (vLLM): every request without in-LLM pooling"},
    )
    triton_staged_model: str = field(
        default="squint_llm_staged",
        metadata={"help": "the LLM worker's staged engine in Triton: requests that pool inside the LLM (image spans)"},
    )
    default_compressor: str = field(
        default="", metadata={"help": "compressor when a request names none; empty: the vision worker's default"}
    )
    request_timeout_seconds: float = field(default=300.0, metadata={"help": "deadline of downstream calls"})
    allocation_policy: str = field(
        default="uniform", metadata={"help": f"default budget split: {' or '.join(POLICIES)}"}
    )
    budget_floor_share: float = field(
        default=DEFAULT_FLOOR_SHARE,
        metadata={
            "help": "complexity policy: every item first gets at least this share of its fair part "
            "(budget / items), rounded to one of its token counts"
        },
    )
    dedup_threshold: float = field(
        default=0.98, metadata={"help": "default cosine similarity at which consecutive frames are dropped; > 1 is off"}
    )
    pixel_dedup_threshold: float = field(
        default=0.96,
        metadata={
            "help": "consecutive frames whose 16x16 thumbnails differ by at most (1 - this) of full scale in every "
            "cell are skipped before CLIP; > 1 is off (so is dedup_threshold > 1)"
        },
    )
    frame_timestamps: bool = field(
        default=True,
        metadata={"help": 'put each video frame\'s time before it in the prompt ("frame at 12.5 s:")'},
    )
    worker_down_seconds: float = field(default=5.0, metadata={"help": "how long a failed vision worker is tried last"})
    llm_down_seconds: float = field(
        default=5.0,
        metadata={"help": "how long an LLM worker that failed UNAVAILABLE is tried last (another takes its requests)"},
    )
    llm_startup_grace_seconds: float = field(
        default=600.0,
        metadata={
            "help": "how long an LLM worker may take to become ready after it is first listed before a warning says "
            "so (until then it is loading its models, said at INFO)"
        },
    )
    llm_health_seconds: float = field(
        default=2.0,
        metadata={
            "help": "how often each LLM worker is asked whether it is ready (Triton's ServerReady): one that is not is "
            "tried last, and the GenerationService's gRPC health is NOT_SERVING while none is; 0: never ask"
        },
    )
    grpc: GrpcServerSettings = field(default_factory=lambda: GrpcServerSettings(port=DEFAULT_PORT))
    http: HttpSettings = field(default_factory=HttpSettings)
    limits: RequestLimits = field(default_factory=RequestLimits)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    # The LLM workers (Triton endpoints), found as the vision workers are; static and empty: triton_url alone.
    llm_discovery: DiscoverySettings = field(default_factory=lambda: DiscoverySettings(static_workers=()))
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    vision_tls: ClientTlsSettings = field(default_factory=ClientTlsSettings)
    triton_tls: ClientTlsSettings = field(default_factory=ClientTlsSettings)
    video: VideoLimits = field(default_factory=VideoLimits)
    frames: FrameSampling = field(default_factory=FrameSampling)

    def __post_init__(self) -> None:
        # Checked at start-up, not on the first request that needs them.
        if self.allocation_policy not in POLICIES:
            raise SettingsError(
                f"{ENV_PREFIX}ALLOCATION_POLICY is {self.allocation_policy!r}; it must be {' or '.join(POLICIES)}"
            )
        if not 0.0 <= self.budget_floor_share <= 1.0:
            raise SettingsError(f"{ENV_PREFIX}BUDGET_FLOOR_SHARE is {self.budget_floor_share}; it must be in [0, 1]")
        if self.dedup_threshold < -1.0:
            raise SettingsError(f"{ENV_PREFIX}DEDUP_THRESHOLD is {self.dedup_threshold}; it must be >= -1 (> 1: off)")
        if self.pixel_dedup_threshold < 0.0:
            raise SettingsError(
                f"{ENV_PREFIX}PIXEL_DEDUP_THRESHOLD is {self.pixel_dedup_threshold}; it must be >= 0 (> 1: off)"
            )

    def llm_endpoints(self) -> DiscoverySettings:
        """Where the LLM workers are: ``llm_discovery``, or ``triton_url`` alone when that is static
        and lists no endpoint (the single-endpoint case, as before there could be several)."""
        if self.llm_discovery.mode == "static" and not self.llm_discovery.static_workers:
            return dataclasses.replace(self.llm_discovery, static_workers=(self.triton_url,))
        return self.llm_discovery


def orchestrator_settings(env=None, overrides=None) -> OrchestratorSettings:
    return load_settings(OrchestratorSettings, ENV_PREFIX, env, overrides)
