"""What ``squint bench`` measures: the compressor cases and how many of everything.

:data:`FULL` and :data:`QUICK` are the presets ``squint bench`` and ``squint bench --quick`` run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

QUESTION = "What is in this image?"


@dataclass(frozen=True)
class Case:
    """One compressor setting the stack is measured with."""

    name: str  # how the table names it
    compressor: str
    params: Mapping[str, Any] = field(default_factory=dict)


CASES: tuple[Case, ...] = (
    Case("none", "none"),
    Case("avgpool", "avgpool"),
    Case("dfmr", "dfmr"),
    Case("staged_pool layer=-1", "staged_pool", {"layer": -1}),
    Case("staged_pool layer=2", "staged_pool", {"layer": 2}),
    Case("text_recovery", "text_recovery"),
    Case("stf", "stf"),
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
    question: str = QUESTION
    device: str = "cpu"
    image_size: tuple[int, int] = (400, 300)
    request_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        for name in ("repeats", "max_new_tokens", "requests_per_client", "throughput_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchSettings.{name} is {getattr(self, name)}; it must be at least 1")


FULL = BenchSettings()
QUICK = BenchSettings(mode="quick", repeats=2, warm_repeats=2, max_new_tokens=8, media_repeats=1)
