"""The LLM worker's settings: environment ``SQUINT_LLM_*``, the model config's parameters, the instance.

Triton hands the python backend's ``initialize`` a dict of strings (``model_config`` as JSON,
``model_instance_kind``, ``model_instance_device_id``...). :func:`settings_from_triton_args`
turns that dict and the environment into one frozen :class:`LLMWorkerSettings`, once, so the
adapter holds no option dicts. A ``parameters`` entry in ``config.pbtxt`` (``pack_dir``,
``dtype``, ``default_max_new_tokens``) wins over the variable of the same name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from llm_worker.engine import DType
from llm_worker.staged import DECODE_TILE
from squint.config import SettingsError, load_settings
from squint.packs import ModelPack, PackError, load_pack


@dataclass(frozen=True)
class SchedulerSettings:
    """How many requests one LLM worker serves at once (``SQUINT_LLM_MAX_BATCH``, ``..._MAX_QUEUE``)."""

    max_batch: int = 64
    max_queue: int = 64

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise SettingsError(f"{ENV_PREFIX}MAX_BATCH is {self.max_batch}; it must be at least 1")
        if self.max_queue < 1:
            raise SettingsError(f"{ENV_PREFIX}MAX_QUEUE is {self.max_queue}; it must be at least 1")


logger = logging.getLogger(__name__)

ENV_PREFIX = "SQUINT_LLM_"


@dataclass(frozen=True)
class LLMWorkerSettings:
    """What one LLM worker instance serves, and on what."""

    pack_dir: Path | None = field(default=None, metadata={"help": "model pack folder (its llava checkpoint is served)"})
    dtype: DType = field(default="auto", metadata={"help": "weights dtype; auto keeps the checkpoint's"})
    default_max_new_tokens: int = field(default=64, metadata={"help": "max_new_tokens when a request sets none"})
    # 64: under 64 streams on the tiny pack, TTFT p99 3.7 s against 5.2 s at 8 (bench/load.py,
    # docs/reliability.md); vLLM's own default is larger still, its KV cache bounds it anyway.
    max_batch: int = field(
        default=64, metadata={"help": "sequences decoded together in one step (vLLM's max_num_seqs)"}
    )
    max_queue: int = field(
        default=64, metadata={"help": "requests waiting for a batch slot; more are refused as busy (UNAVAILABLE)"}
    )
    device: str = field(default="cpu", metadata={"help": "torch device; under Triton the instance kind decides"})
    decode_tile: int = field(
        default=DECODE_TILE,
        metadata={
            "help": "rows every decode step's linear layers run on (padded): answers do not depend on the batch; "
            "1 decodes a lone stream fastest on CPU, 8 shares weight reads across a batch"
        },
    )

    # The vLLM engine (squint_llm); max_batch is its max_num_seqs.
    vllm_max_model_len: int = field(default=0, metadata={"help": "vLLM's max_model_len; 0 = the model's context"})
    vllm_kv_cache_bytes: int = field(
        default=0,
        metadata={"help": "bytes of KV cache vLLM reserves; 0 = 512 MiB on CPU, vllm_memory_fraction of a GPU"},
    )
    vllm_memory_fraction: float = field(
        default=0.9, metadata={"help": "share of the GPU's memory vLLM may use (of the machine's memory on CPU)"}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one vLLM engine spans"})
    vllm_chunked_prefill: bool = field(default=True, metadata={"help": "vLLM's chunked prefill"})
    vllm_prefix_caching: bool = field(default=False, metadata={"help": "vLLM's prefix caching"})
    vllm_enforce_eager: bool = field(default=False, metadata={"help": "no CUDA graphs (always so on CPU)"})
    vllm_cpu_reserved_cores: int = field(
        default=-1,
        metadata={
            "help": "CPU only: cores vLLM keeps for its frontend instead of computing on them; "
            "-1 = none on machines of up to 4 cores, else vLLM's default (one)"
        },
    )
    vllm_idle_spin_seconds: float = field(
        default=-1.0,
        metadata={
            "help": "seconds vLLM's worker keeps polling for its next step after the last before it sleeps "
            "(vLLM's own: 1); negative = 0.1 on CPU, where the poll takes a core CLIP shares, vLLM's own on GPU"
        },
    )
    vllm_metrics: bool = field(
        default=True,
        metadata={"help": "vLLM's own engine metrics (vllm:*) on Triton's metrics endpoint, beside squint_llm_*"},
    )

    def __post_init__(self) -> None:
        if self.vllm_tensor_parallel_size < 1:
            raise SettingsError(f"{ENV_PREFIX}VLLM_TENSOR_PARALLEL_SIZE is {self.vllm_tensor_parallel_size}; >= 1")
        if not 0 < self.vllm_memory_fraction <= 1:
            raise SettingsError(f"{ENV_PREFIX}VLLM_MEMORY_FRACTION is {self.vllm_memory_fraction}; in (0, 1]")
        if not (1 <= self.decode_tile < 32 or (self.decode_tile > 0 and self.decode_tile % 64 == 0)):
            raise SettingsError(
                f"{ENV_PREFIX}DECODE_TILE is {self.decode_tile}; it must be 1..31 or a multiple of 64 "
                "(sizes whose elementwise maths takes one code path per row)"
            )

    def scheduler(self) -> SchedulerSettings:
        """The batching limits as the generation loop takes them (checked there)."""
        return SchedulerSettings(max_batch=self.max_batch, max_queue=self.max_queue)

    def require_pack(self) -> ModelPack:
        """The configured pack, or an error that says how to configure one."""
        if self.pack_dir is None:
            raise SettingsError(
                f"no model pack configured: set {ENV_PREFIX}PACK_DIR in tritonserver's environment "
                "or the parameter pack_dir in config.pbtxt to a pack folder (`squint pack tiny DIR` writes one)"
            )
        try:
            return load_pack(self.pack_dir)
        except PackError as exc:
            raise SettingsError(f"{ENV_PREFIX}PACK_DIR / pack_dir: {exc}") from None


# Parameters in config.pbtxt that belong to the python backend itself, not to us.
_BACKEND_PARAMETERS = {"EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS"}


def settings_from_triton_args(args: Mapping[str, str], env: Mapping[str, str] | None = None) -> LLMWorkerSettings:
    """Build the settings from Triton's ``initialize`` args and the environment.

    Raises :class:`SettingsError` naming the variable or parameter that is wrong.
    """
    env = dict(os.environ if env is None else env)
    config = json.loads(args["model_config"])
    known = {name.upper() for name in LLMWorkerSettings.__dataclass_fields__} - {"DEVICE"}
    for name, value in (config.get("parameters") or {}).items():
        if name in _BACKEND_PARAMETERS:
            continue
        if name.upper() not in known:
            raise SettingsError(
                f"config.pbtxt parameter {name!r} is unknown; known: {', '.join(sorted(k.lower() for k in known))}"
            )
        env[ENV_PREFIX + name.upper()] = value["string_value"]
    settings = load_settings(LLMWorkerSettings, ENV_PREFIX, env=env)
    return replace(settings, device=_instance_device(args))


def _instance_device(args: Mapping[str, str]) -> str:
    kind = args.get("model_instance_kind", "CPU")
    if kind == "CPU":
        return "cpu"
    if kind == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id', '0'))}"
    raise SettingsError(f"instance_group kind {kind!r} is not supported; use KIND_CPU or KIND_GPU")


__all__ = ["ENV_PREFIX", "LLMWorkerSettings", "settings_from_triton_args"]
