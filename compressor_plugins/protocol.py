"""The typed contract between the vision worker and a compressor.

A compressor receives the CLIP output of one image (:class:`ImageFeatures`) and returns fewer
tokens (:class:`CompressedImage`). It declares, as class attributes, what it needs, where its
output lives, and its parameters with defaults and bounds, so that requests are validated and
token counts predicted before any tensor is touched.

Beyond :class:`Compressor`, a class may implement optional capabilities (:data:`CAPABILITIES`):
:class:`FitsBudget`, :class:`LoadsWeights`, :class:`Calibrates`. Each is all of its members or
none; the registry refuses a class with some of a capability's members and not the others.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from squint.errors import InvalidRequest
from squint.packs import PackError

logger = logging.getLogger(__name__)

# The file a calibration is stored in, inside the compressor's folder of a pack.
CALIBRATION_FILE = "calibration.json"


class LoadError(PackError):
    """What a compressor holds in its pack folder (weights, a calibration) is missing, incomplete
    or does not fit. Raised at start-up by ``load_weights`` and ``load_calibration``; the vision
    worker stops with the message, which names the folder and what to fix."""


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

    def coerce(self, compressor: str, value: Any, where: str = "") -> Any:
        """``value`` as this parameter's type, or :class:`InvalidRequest` naming the limit.

        ``None`` is accepted where the default is ``None`` (meaning "the compressor decides").
        ``where`` names the value in messages; by default ``compressor.params.<name>``.
        """
        where = where or f"compressor.params.{self.name} (compressor {compressor!r})"
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
    """Asks the LLM worker to pool this image's span inside the LLM (staged pooling).

    The tokens a compressor returns are what enters the LLM and what the budget counts; the
    directive then averages windows of them at the entry of decoder ``layer``.
    """

    layer: int  # pool at the entry of this 0-based decoder layer, >= 0
    stride: int  # window length, >= 1
    shape: str = "1d"  # "1d" (raster windows, the paper's) or "2d" (s x s windows)
    reference_mode: bool = False  # pooled positions as the released code (float16 means)


@dataclass(frozen=True)
class CompressedImage:
    """What a compressor returns for one image; ``m`` output tokens, ``n`` input patches."""

    tokens: torch.Tensor  # [m, d] in vision space, or [m, llm_hidden] in LLM space
    # For each output token, the raster indices (row * grid_width + column, 0..n-1) of the
    # original patches it stands for: at least one each.
    covers: tuple[tuple[int, ...], ...]
    # How much detail the image holds, higher = richer (DFMR's mean window standard deviation).
    # The orchestrator's "complexity" budget policy weighs items by it. None: the vision worker
    # reports σ̄ of the image's features instead (compressor_plugins.complexity). Finite when given.
    complexity: float | None = None
    directive: LLMDirective | None = None  # pool this image's span inside the LLM as well
    notes: Mapping[str, Any] = field(default_factory=dict)  # diagnostics for tests; the worker ignores them

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"tokens must be [m, d], got shape {tuple(self.tokens.shape)}")
        if len(self.covers) != self.tokens.shape[0]:
            raise ValueError(f"{len(self.covers)} coverage entries for {self.tokens.shape[0]} tokens")


@runtime_checkable
class Compressor(Protocol):
    """A visual-token compressor. Instances are created once per worker and reused.

    The rules every compressor keeps (the conformance kit, ``compressor_plugins.testing``,
    checks each of them):

    - ``compress`` returns a :class:`CompressedImage` of at least one token, ``d`` = CLIP's
      width in :attr:`OutputSpace.VISION`, the LLM's in :attr:`OutputSpace.LLM`; tokens of the
      dtype of ``features.patch_features`` (float16 on a GPU, float32 on a CPU), all finite.
    - The count equals ``predict_tokens(grid, params)`` whenever that is not ``None``.
    - ``covers`` has one non-empty entry per token, each index in ``0..n-1``.
    - Deterministic, and no state from one image to the next: the same image and parameters
      give the same tokens, whatever was compressed in between.
    - ``params`` arrive validated and complete (:func:`resolve_params`); read only the
      ``features`` fields named in ``needs`` (the others may be ``None``).

    Errors while serving a request are the domain errors of :mod:`squint.errors`, whose
    message the client reads:

    - :class:`~squint.errors.InvalidRequest` (INVALID_ARGUMENT): the parameters, or this
      image's grid, cannot be served (use :func:`check_grid`); ``predict_tokens`` raises it too.
    - :class:`~squint.errors.BudgetExceeded` (RESOURCE_EXHAUSTED): ``compress_within`` cannot
      fit the budget with these parameters.
    - :class:`~squint.errors.Unsupported` (UNIMPLEMENTED): this deployment cannot run the
      compressor, e.g. its pack holds no weights for it.

    Anything else is a bug: the client gets INTERNAL, the log gets the message. Problems with
    the pack's folder found at start-up are :class:`LoadError`.
    """

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


# -------------------------------------------------------------------------------------------
# Optional capabilities: each Protocol below is the one definition of its members.
# -------------------------------------------------------------------------------------------


@runtime_checkable
class FitsBudget(Protocol):
    """Capability: a compressor that can degrade gracefully to at most ``budget`` tokens
    (DFMR steps its factor, text-guided recovery drops its lowest-scored tokens).

    The vision worker calls ``compress_within`` instead of ``compress`` when an item has a
    budget, and the orchestrator's budget allocator picks each item's count from
    ``token_levels``. Without the capability, an output over an item's budget is refused with
    RESOURCE_EXHAUSTED.
    """

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage:
        """At most ``budget`` tokens (the other rules of :class:`Compressor` hold; the count
        need not equal ``predict_tokens``), or :class:`~squint.errors.BudgetExceeded` saying
        why these parameters cannot degrade that far."""
        ...

    def token_levels(self, grid: tuple[int, int], params: Mapping[str, Any], natural: int) -> tuple[int, ...]:
        """Every count ``compress_within`` can land on, strictly descending from ``natural`` (the
        unconstrained count for this image): ``compress_within(..., budget=level)`` returns
        exactly ``level`` tokens for each of them."""
        ...


@runtime_checkable
class LoadsWeights(Protocol):
    """Capability: a compressor with learned weights loads them from the pack once."""

    def load_weights(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        """Load from ``folder``, the one the pack's manifest names under ``"compressors":
        {"<name>": "<folder>"}``, onto ``device`` in ``dtype``. Called once at start-up, before
        any request, and only when the manifest names a folder; raise :class:`LoadError` naming
        what is missing or does not fit."""
        ...


@dataclass(frozen=True)
class Calibration:
    """What :meth:`Calibrates.calibrate` returns."""

    # Stored as calibration.json in the compressor's pack folder and handed back, parsed, to
    # load_calibration: JSON types only (dicts with string keys, lists, numbers, strings, bools).
    data: Mapping[str, Any]
    summary: str = ""  # printed after "calibrated <name> on <n> images: ", e.g. the fitted thresholds
    details: tuple[str, ...] = ()  # further lines for the operator


@runtime_checkable
class Calibrates(Protocol):
    """Capability: fitted to a deployment's own images with ``squint calibrate NAME``.

    The command computes the features the compressor ``needs`` for each image of a folder,
    calls ``calibrate`` with them, writes ``Calibration.data`` to ``calibration.json`` in the
    folder the pack names for the compressor (``<pack>/<name>`` when it names none, then added
    to the manifest) and recomputes the pack id. At start-up the vision worker hands that file,
    parsed, to ``load_calibration`` (after ``load_weights``, when the compressor has both).
    """

    # The options of `squint calibrate NAME`: each is --<name> (underscores as dashes).
    calibration_params: ClassVar[tuple[ParamSpec, ...]]

    def calibrate(self, samples: Iterable[ImageFeatures], params: Mapping[str, Any]) -> Calibration:
        """Fit to ``samples`` (iterated once; features are computed as it goes). ``params`` are
        the ``calibration_params``, validated and complete. Independent of any calibration
        already loaded; raise :class:`~squint.errors.InvalidRequest` on unusable options."""
        ...

    def load_calibration(self, data: Mapping[str, Any]) -> None:
        """Use a calibration: the ``data`` a previous ``calibrate`` returned, read back from
        JSON. Called once at start-up; raise :class:`LoadError` when ``data`` is unusable."""
        ...


@dataclass(frozen=True)
class Capability:
    """One optional capability: its Protocol defines the members; all of them or none."""

    name: str  # as `describe()` and `squint plugins list --json` report it
    protocol: type
    kind: str  # what a compressor with it is called, for messages
    label: str  # for `squint plugins list`

    @property
    def attributes(self) -> tuple[str, ...]:
        """The protocol's class attributes, in the order they are written."""
        return tuple(vars(self.protocol).get("__annotations__", {}))

    @property
    def methods(self) -> tuple[str, ...]:
        """The protocol's methods, in the order they are written."""
        return tuple(name for name, value in vars(self.protocol).items() if callable(value) and name[0] != "_")

    @property
    def members(self) -> tuple[str, ...]:
        return self.attributes + self.methods


CAPABILITIES: tuple[Capability, ...] = (
    Capability("fits_budget", FitsBudget, "a budget-fitting compressor", "degrades to fit a budget"),
    Capability("loads_weights", LoadsWeights, "a compressor with weights", "loads weights from the pack"),
    Capability("calibrates", Calibrates, "a calibrated compressor", "calibrated on your images (squint calibrate)"),
)


class IncompleteCapability(TypeError):
    """A compressor has some of a capability's members but not all of them."""


def capabilities_of(compressor: type | object) -> tuple[Capability, ...]:
    """The capabilities a compressor class (or instance) implements.

    Raises :class:`IncompleteCapability` naming what is missing when it has part of one: a
    class with ``compress_within`` but no ``token_levels`` would otherwise pass for neither.
    """
    name = getattr(compressor, "name", repr(compressor))
    found = []
    for capability in CAPABILITIES:
        present = [attr for attr in capability.attributes if hasattr(compressor, attr)]
        present += [method for method in capability.methods if callable(getattr(compressor, method, None))]
        if not present:
            continue
        missing = [member for member in capability.members if member not in present]
        if missing:
            needs = "both" if len(capability.members) == 2 else "all of " + ", ".join(capability.members)
            raise IncompleteCapability(
                f"compressor {name!r} has {', '.join(present)} but not {', '.join(missing)}: "
                f"{capability.kind} needs {needs}"
            )
        found.append(capability)
    return tuple(found)


# -------------------------------------------------------------------------------------------
# Parameters
# -------------------------------------------------------------------------------------------


def resolve_params(compressor: type[Compressor] | Compressor, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate request parameters against the schema and fill in defaults."""
    return _resolve(compressor.name, compressor.params, raw, "compressor.params.")


def resolve_calibration_params(compressor: type[Calibrates] | Calibrates, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the options of ``squint calibrate NAME`` against ``calibration_params``."""
    return _resolve(compressor.name, compressor.calibration_params, raw, "calibration option ")


def _resolve(compressor: str, params: Iterable[ParamSpec], raw: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    specs = {spec.name: spec for spec in params}
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        accepted = ", ".join(specs) or "no parameters"
        raise InvalidRequest(
            f"{prefix}{unknown[0]} is not a parameter of compressor {compressor!r}; it accepts {accepted}"
        )
    return {
        name: spec.coerce(compressor, raw[name], f"{prefix}{name} (compressor {compressor!r})")
        if name in raw
        else spec.default
        for name, spec in specs.items()
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


# -------------------------------------------------------------------------------------------
# What a pack holds for a compressor
# -------------------------------------------------------------------------------------------


def create_compressor(
    cls: type[Compressor],
    folder: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    calibrated: bool = True,
) -> Compressor:
    """An instance given what its pack folder holds: how the vision worker, ``squint calibrate``
    and the conformance kit make compressors.

    ``folder`` is the one the pack's manifest names for the compressor, or ``None``. With a
    folder, a :class:`LoadsWeights` compressor gets ``load_weights(folder, device, dtype)``,
    then (unless ``calibrated`` is false) a :class:`Calibrates` one gets the parsed
    ``folder/calibration.json``, when that file exists, through ``load_calibration``.
    """
    compressor = cls()
    if folder is None:
        return compressor
    if isinstance(compressor, LoadsWeights):
        compressor.load_weights(folder, device, dtype)
    if calibrated and isinstance(compressor, Calibrates):
        data = read_calibration(folder)
        if data is not None:
            compressor.load_calibration(data)
            logger.info("compressor %r: calibration from %s", cls.name, folder / CALIBRATION_FILE)
    return compressor


def read_calibration(folder: Path) -> dict[str, Any] | None:
    """The parsed ``folder/calibration.json``, or ``None`` when there is none."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LoadError(f"{path} is not valid JSON: {exc}; write it again with `squint calibrate`") from None
    if not isinstance(data, dict):
        raise LoadError(
            f"{path} holds {type(data).__name__}, not a JSON object; write it again with `squint calibrate`"
        )
    return data


def write_calibration(folder: Path, calibration: Calibration) -> Path:
    """Store ``calibration.data`` as ``folder/calibration.json`` (the folder is created)."""
    try:
        text = json.dumps(dict(calibration.data), indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"calibration data must be JSON (no NaN or infinity): {exc}") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CALIBRATION_FILE
    path.write_text(text)
    return path
