"""The typed contract between the vision worker and a compressor.

A compressor receives the CLIP output of one image (:class:`ImageFeatures`) and returns fewer
tokens (:class:`CompressedImage`). It declares, as class attributes, what it needs, where its
output lives, and its parameters with defaults and bounds, so that requests are validated and
token counts predicted before any tensor is touched.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from squint.errors import InvalidRequest


class CompressorInput(enum.Enum):
    """What a compressor can ask the vision worker to compute for it."""

    PATCH_FEATURES = "patch_features"  # the LLaVA feature layer, CLS dropped
    HIDDEN_STATES = "hidden_states"  # every CLIP hidden state, embeddings first
    CLS_TOKEN = "cls_token"  # the CLS row of the feature layer
    LAST_BLOCK_QK = "last_block_qk"  # q_proj/k_proj outputs of CLIP's last block
    PROJECTED_PATCHES = "projected_patches"  # CLIP's visual_projection of every last-layer token
    QUESTION_EMBEDDING = "question_embedding"  # CLIP text embedding of the user's question
    LLM_TOKENS = "llm_tokens"  # the patch features through the LLaVA projector


class OutputSpace(enum.Enum):
    """Where the returned tokens live."""

    VISION = "vision"  # CLIP width: the worker applies the LLaVA projector afterwards
    LLM = "llm"  # LLM width: the compressor replaced the projector


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a compressor accepts: its type, default and inclusive bounds."""

    name: str
    type: type  # int, float, bool or str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    description: str = ""

    def coerce(self, compressor: str, value: Any) -> Any:
        """``value`` as this parameter's type, or :class:`InvalidRequest` naming the limit.

        ``None`` is accepted where the default is ``None`` (meaning "the compressor decides").
        """
        where = f"compressor.params.{self.name} (compressor {compressor!r})"
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise InvalidRequest(f"{where} must be true or false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise InvalidRequest(f"{where} must be a string, got {value!r}")
            if self.choices and value not in self.choices:
                raise InvalidRequest(f"{where} must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{where} must be a number, got {value!r}")
        if self.type is int:
            if not math.isfinite(value) or value != int(value):
                raise InvalidRequest(f"{where} must be a whole number, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise InvalidRequest(f"{where} must be finite, got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise InvalidRequest(f"{where} is {value}; the minimum is {self.minimum:g}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidRequest(f"{where} is {value}; the maximum is {self.maximum:g}")
        return value


@dataclass(frozen=True)
class ImageFeatures:
    """The CLIP outputs of one image, as much as the compressor declared it needs.

    ``n`` = grid_height * grid_width patches, ``d`` = CLIP width, ``p`` = CLIP projection width.
    """

    patch_features: torch.Tensor  # [n, d] the LLaVA feature layer, CLS dropped, raster order
    grid: tuple[int, int]  # (grid_height, grid_width)
    cls_token: torch.Tensor | None = None  # [d]
    hidden_states: tuple[torch.Tensor, ...] | None = None  # each [1 + n, d]; index 0 = embeddings
    last_block_qk: tuple[torch.Tensor, torch.Tensor] | None = None  # q, k: each [1 + n, d]
    projected_patches: torch.Tensor | None = None  # [1 + n, p]
    question_embedding: torch.Tensor | None = None  # [p] CLIP's pooled end-of-text embedding
    # [p] the released RC code's choice: text_projection of the last (padding) position of 77
    question_embedding_last_position: torch.Tensor | None = None
    llm_tokens: torch.Tensor | None = None  # [n, llm_hidden] patch features through the projector


@dataclass(frozen=True)
class LLMDirective:
    """Asks the LLM worker to pool this image's span inside the LLM (staged pooling)."""

    layer: int  # pool at the entry of this 0-based decoder layer
    stride: int  # window length
    shape: str = "1d"  # "1d" (raster windows, the paper's) or "2d" (s x s windows)
    reference_mode: bool = False  # pooled positions as the released code (float16 means)


@dataclass(frozen=True)
class CompressedImage:
    """What a compressor returns for one image; ``m`` output tokens."""

    tokens: torch.Tensor  # [m, d] in vision space, or [m, llm_hidden] in LLM space
    # For each output token, the raster indices of the original patches it covers.
    covers: tuple[tuple[int, ...], ...]
    complexity: float | None = None  # e.g. DFMR's mean window standard deviation
    directive: LLMDirective | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"dropped_rows": 1}

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [m, d], got shape {tuple(self.tokens.shape)}")
        if len(self.covers) != self.tokens.shape[0]:
            raise ValueError(f"{len(self.covers)} coverage entries for {self.tokens.shape[0]} tokens")


@runtime_checkable
class Compressor(Protocol):
    """A visual-token compressor. Instances are created once per worker and reused."""

    name: ClassVar[str]  # unique registered name, lowercase with underscores
    summary: ClassVar[str]  # one line for `squint plugins list`
    params: ClassVar[tuple[ParamSpec, ...]]
    needs: ClassVar[frozenset[CompressorInput]]
    output_space: ClassVar[OutputSpace]

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int | None:
        """Tokens :meth:`compress` will emit for a grid, or ``None`` when it depends on the image."""
        ...

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        """Compress one image. ``params`` are already validated and complete."""
        ...


@runtime_checkable
class FitsBudget(Protocol):
    """Capability: a compressor that can degrade gracefully to at most ``budget`` tokens
    (DFMR steps its factor, text-guided recovery drops its lowest-scored tokens). It returns at
    most ``budget`` tokens or raises :class:`squint.errors.BudgetExceeded` saying why it cannot.
    Without the capability, an output over an item's budget is refused with RESOURCE_EXHAUSTED."""

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage: ...

    def token_levels(self, grid: tuple[int, int], params: Mapping[str, Any], natural: int) -> tuple[int, ...]:
        """Every count ``compress_within`` can land on, strictly descending from ``natural`` (the
        unconstrained count for this image): what the orchestrator's budget allocator picks from."""
        ...


@runtime_checkable
class LoadsWeights(Protocol):
    """Capability: a compressor with learned weights loads them from the pack once."""

    def load_weights(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None: ...


def resolve_params(compressor: type[Compressor] | Compressor, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate request parameters against the schema and fill in defaults."""
    specs = {spec.name: spec for spec in compressor.params}
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        accepted = ", ".join(specs) or "no parameters"
        raise InvalidRequest(
            f"compressor.params.{unknown[0]} is not a parameter of compressor {compressor.name!r}; "
            f"it accepts {accepted}"
        )
    return {
        name: spec.coerce(compressor.name, raw[name]) if name in raw else spec.default for name, spec in specs.items()
    }


def canonical_params(params: Mapping[str, Any]) -> str:
    """A stable text form of resolved parameters, for cache keys."""
    return json.dumps(dict(params), sort_keys=True, separators=(",", ":"))


def check_grid(compressor: str, grid: tuple[int, int], min_side: int = 1) -> None:
    """Reject grids a grid-based compressor cannot handle, saying which and why."""
    rows, cols = grid
    if rows != cols:
        raise InvalidRequest(f"compressor {compressor!r} needs a square patch grid; this image gives {rows}x{cols}")
    if rows < min_side:
        raise InvalidRequest(
            f"compressor {compressor!r} needs a grid of at least {min_side}x{min_side}; got {rows}x{cols}"
        )
