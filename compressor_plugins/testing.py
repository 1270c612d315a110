"""The conformance kit: what every Squint compressor must satisfy. Run it in your plugin's CI.

Either subclass the pytest suite::

    from compressor_plugins.testing import CompressorConformance

    class TestMyMerge(CompressorConformance):
        compressor_class = MyMerge
        param_cases = ({}, {"ratio": 0.25})

or call :func:`check_compressor` yourself. Inputs are synthetic (seeded, every input a
compressor can declare, consistent shapes) unless you pass ``features`` of your own; a
compressor with weights (or a calibration) gets them from ``weights_dir``, the folder a pack
would name for it, as the vision worker gives them (:func:`create_compressor`).

The rules are those of :class:`compressor_plugins.protocol.Compressor` and of each capability
it implements (:data:`compressor_plugins.protocol.CAPABILITIES`); a class with part of a
capability fails the declaration check, naming what is missing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from compressor_plugins.protocol import (
    Calibrates,
    Calibration,
    CompressedImage,
    Compressor,
    CompressorInput,
    FitsBudget,
    ImageFeatures,
    OutputSpace,
    capabilities_of,
    create_compressor,
    resolve_calibration_params,
    resolve_params,
)
from compressor_plugins.registry import PluginLoadError, _check_declaration
from squint.errors import BudgetExceeded, InvalidRequest


@dataclass(frozen=True)
class Dimensions:
    """The widths synthetic features are drawn with (a tiny CLIP and LLM by default)."""

    vision: int = 32  # CLIP width d
    llm: int = 64  # LLM width
    projection: int = 16  # CLIP projection width p
    layers: int = 24  # CLIP blocks; hidden_states has layers + 1 entries


def synthetic_features(
    grid: tuple[int, int] = (24, 24),
    dims: Dimensions = Dimensions(),
    seed: int = 0,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ImageFeatures:
    """Every input a compressor may declare, seeded, for a grid of any shape."""
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    hidden = tuple(torch.randn(1 + n, dims.vision, generator=g) for _ in range(dims.layers + 1))
    patches = hidden[-2][1:]  # LLaVA's feature layer, CLS dropped: [n, d]
    project = project or (lambda x: x @ torch.randn(dims.vision, dims.llm, generator=torch.Generator().manual_seed(1)))
    return ImageFeatures(
        patch_features=patches,
        grid=grid,
        cls_token=hidden[-2][0],
        hidden_states=hidden,
        last_block_qk=(torch.randn(1 + n, dims.vision, generator=g), torch.randn(1 + n, dims.vision, generator=g)),
        projected_patches=torch.randn(1 + n, dims.projection, generator=g),
        question_embedding=torch.randn(dims.projection, generator=g),
        question_embedding_last_position=torch.randn(dims.projection, generator=g),
        llm_tokens=project(patches),
    )


class ConformanceError(AssertionError):
    """A compressor breaks the contract; the message says which rule and with what."""


def _fail(compressor: Compressor, params: Mapping[str, Any], message: str) -> None:
    raise ConformanceError(f"compressor {compressor.name!r} with params {dict(params)}: {message}")


def check_output(
    compressor: Compressor,
    params: Mapping[str, Any],
    features: ImageFeatures,
    out: CompressedImage,
    dims: Dimensions,
    predicted: bool = True,
) -> None:
    """Shapes, dtype, the count against the prediction (unless fitted to a budget), coverage."""
    n = features.grid[0] * features.grid[1]
    width = dims.vision if compressor.output_space is OutputSpace.VISION else dims.llm
    if not isinstance(out, CompressedImage):
        _fail(compressor, params, f"compress returned {type(out).__name__}, not CompressedImage")
    if out.tokens.ndim != 2 or out.tokens.shape[1] != width:
        _fail(
            compressor,
            params,
            f"tokens have shape {tuple(out.tokens.shape)}; expected "
            f"[m, {width}] ({compressor.output_space.value} space)",
        )
    if out.tokens.dtype != features.patch_features.dtype:
        _fail(
            compressor,
            params,
            f"tokens are {out.tokens.dtype}; the input features were {features.patch_features.dtype}",
        )
    if not torch.isfinite(out.tokens).all():
        _fail(compressor, params, "tokens contain NaN or infinity")
    m = out.tokens.shape[0]
    if m < 1:
        _fail(compressor, params, "returned no tokens; an image must keep at least one")
    prediction = compressor.predict_tokens(features.grid, params) if predicted else None
    if prediction is not None and prediction != m:
        _fail(compressor, params, f"predicted {prediction} tokens for grid {features.grid} but returned {m}")
    if len(out.covers) != m:
        _fail(compressor, params, f"{len(out.covers)} coverage entries for {m} tokens")
    for index, covered in enumerate(out.covers):
        if not covered:
            _fail(compressor, params, f"token {index} covers no patch")
        if any(not 0 <= p < n for p in covered):
            _fail(compressor, params, f"token {index} covers {sorted(covered)}, outside 0..{n - 1}")
    if out.directive is not None and (out.directive.layer < 0 or out.directive.stride < 1):
        _fail(compressor, params, f"invalid in-LLM directive {out.directive}")
    if out.complexity is not None and not math.isfinite(out.complexity):
        _fail(compressor, params, f"complexity is {out.complexity}; give a finite number or None")


def check_compressor(
    compressor: Compressor,
    param_cases: Sequence[Mapping[str, Any]] = ({},),
    dims: Dimensions = Dimensions(),
    features: ImageFeatures | None = None,
    other_features: ImageFeatures | None = None,
    edge_grids: Sequence[tuple[int, int]] = ((4, 4), (2, 2), (5, 5), (4, 6), (1, 1)),
    calibration_samples: Sequence[ImageFeatures] | None = None,
) -> None:
    """Run every rule; raises :class:`ConformanceError` at the first broken one.

    A :class:`Calibrates` compressor is calibrated last, on ``calibration_samples`` (default:
    ``features`` and ``other_features``), and left holding that calibration.
    """
    try:
        _check_declaration(type(compressor), "under test")
    except PluginLoadError as exc:
        raise ConformanceError(str(exc)) from None
    protocols = {capability.protocol for capability in capabilities_of(compressor)}
    with pytest.raises(InvalidRequest):
        resolve_params(compressor, {"no_such_parameter_xyz": 1})
    features = features or synthetic_features(dims=dims, seed=0)
    other_features = other_features or synthetic_features(grid=features.grid, dims=dims, seed=1)
    for raw in param_cases:
        params = resolve_params(compressor, raw)
        first = compressor.compress(features, params)
        check_output(compressor, params, features, first, dims)
        # Determinism, and no state carried from one image to the next.
        compressor.compress(other_features, params)
        again = compressor.compress(features, params)
        if not torch.equal(first.tokens, again.tokens) or first.covers != again.covers:
            _fail(compressor, params, "two calls on the same image, one apart, gave different outputs")
        if FitsBudget in protocols and first.tokens.shape[0] > 1:
            _check_budget_fit(compressor, params, features, first.tokens.shape[0] // 2, dims)
        for grid in edge_grids:
            edge = synthetic_features(grid=grid, dims=dims, seed=2)
            try:
                out = compressor.compress(edge, params)
            except InvalidRequest:
                continue  # refusing a grid it cannot handle, with a clear error, is allowed
            except Exception as exc:  # noqa: BLE001 - the rule is exactly "no other exception"
                _fail(
                    compressor, params, f"grid {grid} raised {type(exc).__name__}: {exc} (refuse with InvalidRequest)"
                )
            check_output(compressor, params, edge, out, dims)
    if Calibrates in protocols:
        _check_calibration(compressor, param_cases, calibration_samples or (features, other_features), dims)


def _check_calibration(
    compressor: Compressor, param_cases: Sequence[Mapping[str, Any]], samples: Sequence[ImageFeatures], dims: Dimensions
) -> None:
    """JSON data, the same data every time (whatever is loaded), outputs still conform once loaded."""
    for spec in compressor.calibration_params:
        if spec.coerce(compressor.name, spec.default) != spec.default:
            _fail(compressor, {}, f"calibration option {spec.name}: its default fails its own bounds")
    with pytest.raises(InvalidRequest):
        resolve_calibration_params(compressor, {"no_such_option_xyz": 1})
    options = resolve_calibration_params(compressor, {})
    calibration = compressor.calibrate(iter(samples), options)
    if not isinstance(calibration, Calibration):
        _fail(compressor, options, f"calibrate returned {type(calibration).__name__}, not Calibration")
    try:
        text = json.dumps(dict(calibration.data), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        _fail(compressor, options, f"calibration data is not plain JSON: {exc}")
    compressor.load_calibration(json.loads(text))
    again = compressor.calibrate(iter(samples), options)
    if json.dumps(dict(again.data), sort_keys=True, allow_nan=False) != text:
        _fail(compressor, options, "calibrating the same images twice (the first result loaded) gave different data")
    for raw in param_cases:
        params = resolve_params(compressor, raw)
        for features in samples:
            check_output(compressor, params, features, compressor.compress(features, params), dims)


def _check_budget_fit(
    compressor: Compressor, params: Mapping[str, Any], features: ImageFeatures, budget: int, dims: Dimensions
) -> None:
    try:
        fitted = compressor.compress_within(features, params, budget)
    except BudgetExceeded:
        return  # it may refuse, saying why, when its parameters forbid degrading
    check_output(compressor, params, features, fitted, dims, predicted=False)
    if fitted.tokens.shape[0] > budget:
        _fail(compressor, params, f"compress_within(budget={budget}) returned {fitted.tokens.shape[0]} tokens")
    # Every count token_levels offers must be exactly reachable: the allocator picks from them.
    natural = compressor.compress(features, params).tokens.shape[0]
    levels = tuple(compressor.token_levels(features.grid, params, natural))
    if not levels or levels[0] != natural or any(a <= b for a, b in zip(levels, levels[1:])):
        _fail(
            compressor, params, f"token_levels {levels[:8]}... must descend strictly from the natural count {natural}"
        )
    step = max(1, len(levels) // 6)
    for level in levels[::step]:
        got = compressor.compress_within(features, params, level).tokens.shape[0]
        if got != level:
            _fail(compressor, params, f"token_levels offers {level} but compress_within({level}) returned {got}")


class CompressorConformance:
    """A pytest suite over one compressor class; subclass it and set the attributes."""

    compressor_class: ClassVar[type[Compressor]]
    param_cases: ClassVar[Sequence[Mapping[str, Any]]] = ({},)
    dims: ClassVar[Dimensions] = Dimensions()
    weights_dir: ClassVar[Path | None] = None

    @pytest.fixture
    def compressor(self) -> Compressor:
        return create_compressor(self.compressor_class, self.weights_dir, torch.device("cpu"), torch.float32)

    def test_declaration(self, compressor: Compressor) -> None:
        _check_declaration(type(compressor), "under test")
        assert compressor.needs <= set(CompressorInput)
        for spec in compressor.params:
            assert spec.coerce(compressor.name, spec.default) == spec.default, (
                f"default of {spec.name} fails its own bounds"
            )

    def test_contract(self, compressor: Compressor) -> None:
        check_compressor(compressor, self.param_cases, self.dims)
