"""What ``squint bench`` measures: the compressor cases and how many of everything.

:data:`FULL` and :data:`QUICK` are the presets ``squint bench`` and ``squint bench --quick`` run.

The LLM worker has two engines, two Triton models: ``vllm`` (``squint_llm``, vLLM, every request
without in-LLM pooling) and ``staged`` (``squint_llm_staged``, Squint's own engine, for image
spans pooled inside the LLM). Every case names the engine it is measured on; the orchestrator
routes in-LLM pooling to ``staged`` by itself, and a case with no in-LLM pooling goes there only
through a second orchestrator of the bench's own whose ``triton_model`` is ``squint_llm_staged``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

QUESTION = "What is in this image?"


VLLM, STAGED = "vllm", "staged"
# The Triton model of each engine (llm_worker.MODEL_NAME and STAGED_MODEL_NAME).
ENGINE_MODELS: Mapping[str, str] = {VLLM: "squint_llm", STAGED: "squint_llm_staged"}


@dataclass(frozen=True)
class Case:
    """One compressor setting the stack is measured with, on one LLM engine."""

    name: str  # how the table names it
    compressor: str
    params: Mapping[str, Any] = field(default_factory=dict)
    engine: str = ""  # a key of ENGINE_MODELS; "": the one the orchestrator routes it to

    def __post_init__(self) -> None:
        if not self.engine:
            object.__setattr__(self, "engine", STAGED if self.pools_in_llm else VLLM)
        if self.engine not in ENGINE_MODELS:
            raise ValueError(f"Case {self.name!r}: engine {self.engine!r}; expected one of {sorted(ENGINE_MODELS)}")
        if self.pools_in_llm and self.engine != STAGED:
            raise ValueError(
                f"Case {self.name!r} pools inside the LLM (layer {self.params['layer']}), which only the "
                f"{STAGED!r} engine serves; set engine={STAGED!r}"
            )

    @property
    def pools_in_llm(self) -> bool:
        """Whether the orchestrator sends this case's image spans to the staged engine by itself."""
        return self.compressor == "staged_pool" and int(self.params.get("layer", -1)) >= 0


CASES: tuple[Case, ...] = (
    Case("none", "none"),
    Case("avgpool", "avgpool"),
    Case("dfmr", "dfmr"),
    Case("staged_pool layer=-1", "staged_pool", {"layer": -1}),
    Case("staged_pool layer=2", "staged_pool", {"layer": 2}),  # the staged engine: it pools inside the LLM
    Case("text_recovery", "text_recovery"),
    Case("stf", "stf"),
    Case("none", "none", engine=STAGED),
)


@dataclass(frozen=True)
class BenchSettings:
    """How much ``squint bench`` measures. :data:`FULL` and :data:`QUICK` are the presets."""

    mode: str = "full"
    repeats: int = 5  # cold-cache requests per case, each on a fresh image
    warm_repeats: int = 3  # warm-cache requests per case, on its last cold image again
    max_new_tokens: int = 32
    cases: tuple[Case, ...] = CASES
    clients: tuple[int, ...] = (1, 4, 8)
    requests_per_client: int = 2  # sequential Analyze calls per client and repeat
    throughput_repeats: int = 2
    batched_max_batch: int = 8
    media_images: int = 8
    video_frames: int = 16
    media_budget: int = 576
    media_repeats: int = 2
    media_compressor: str = "avgpool"
    # LLM throughput: concurrent streams, each sending stream_requests requests one after
    # another, compressor stream_compressor on images already cached (the vision worker only
    # reads the cache), on each engine of stream_engines.
    streams: tuple[int, ...] = (1, 4, 16)
    stream_requests: int = 3
    stream_compressor: str = "avgpool"
    stream_engines: tuple[str, ...] = (VLLM, STAGED)
    # The LLM worker's SQUINT_LLM_MAX_BATCH in the bench's stack (vLLM's max_num_seqs, the staged
    # engine's decode batch): as many as the most streams, so none waits for a slot.
    llm_max_batch: int = 16
    floor_repeats: int = 3  # CLIP-alone and prefill-alone samples, each
    question: str = QUESTION
    device: str = "cpu"
    image_size: tuple[int, int] = (400, 300)
    request_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("repeats", "max_new_tokens", "requests_per_client", "throughput_repeats", "floor_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchSettings.{name} is {getattr(self, name)}; it must be at least 1")
        for engine in self.stream_engines:
            if engine not in ENGINE_MODELS:
                raise ValueError(f"BenchSettings.stream_engines has {engine!r}; expected of {sorted(ENGINE_MODELS)}")


FULL = BenchSettings()
QUICK = BenchSettings(
    mode="quick",
    repeats=2,
    warm_repeats=2,
    max_new_tokens=8,
    media_repeats=1,
    stream_requests=2,
    stream_engines=(VLLM,),
    floor_repeats=2,
)
