"""``dfmr``: LLaVA-Zip's Dynamic Feature Map Reduction (docs/methods.md §1; from the paper, no code).

Each image picks its own average-pooling factor from how much detail pooling would destroy:
sigma_bar(p) is the mean, over the non-overlapping p x p windows of the (normalised) patch grid,
of the per-channel population standard deviation inside the window, averaged over channels.
Starting at the smallest factor, DFMR steps to the next factor while its sigma_bar stays at or
below the threshold: low variability -> more compression. The pooled grid (``avg_pool2d``,
floor mode) is read in raster order and goes through the usual LLaVA projector.

Decisions the paper leaves open, configurable: features are normalised before the metric
(``feature_norm``, default per-token LayerNorm without affine); channel deviations are
averaged; grids a factor does not divide are floored. Thresholds come, in order, from the
request (``tau``), the pack's calibration (``squint calibrate dfmr``: the Calibrates capability,
stored as ``dfmr/calibration.json`` in the pack), or the paper's 5e-2.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from compressor_plugins import hookimpl
from compressor_plugins.complexity import mean_window_std, normalise
from compressor_plugins.pooling import pool_tokens_2d, window_covers
from compressor_plugins.protocol import (
    Calibration,
    CompressedImage,
    CompressorInput,
    ImageFeatures,
    LoadError,
    OutputSpace,
    ParamSpec,
    check_grid,
    resolve_params,
)
from squint.errors import BudgetExceeded, InvalidRequest

logger = logging.getLogger(__name__)

PAPER_TAU = 5e-2
FEATURE_NORMS = ("none", "layernorm", "l2")


def parse_factors(text: str, where: str = "compressor.params.factors") -> tuple[int, ...]:
    """ "1,2,3" -> (1, 2, 3): whole numbers >= 1, strictly ascending."""
    try:
        factors = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InvalidRequest(f"{where} {text!r} must be comma-separated whole numbers, e.g. 1,2,3") from None
    if not factors or factors[0] < 1 or any(b <= a for a, b in zip(factors, factors[1:])):
        raise InvalidRequest(f"{where} {text!r} must be ascending whole numbers >= 1, e.g. 1,2,3")
    return factors


def parse_shares(text: str, factors: Sequence[int]) -> list[float]:
    """ "0.5,0.25,0.25" -> [0.5, 0.25, 0.25], one share per factor; "" -> equal shares."""
    if not text:
        return [1 / len(factors)] * len(factors)
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidRequest(
            f"calibration option share {text!r} must be comma-separated numbers, one per factor "
            f"({len(factors)} for factors {','.join(map(str, factors))}), e.g. 0.5,0.25,0.25"
        ) from None


def choose_factor(sigmas: Mapping[int, float], factors: Sequence[int], thresholds: Mapping[int, float]) -> int:
    """The last factor reached by stepping up while sigma_bar(next) <= its threshold."""
    chosen = factors[0]
    for factor in factors[1:]:
        if sigmas[factor] > thresholds[factor]:
            break
        chosen = factor
    return chosen


def calibrate(
    profiles: Sequence[Mapping[int, float]], factors: Sequence[int], shares: Sequence[float]
) -> dict[int, float]:
    """Per-step thresholds under which the images split across ``factors`` in ``shares``.

    ``profiles`` holds each image's sigma_bar by factor. Step k (to ``factors[k]``) keeps the
    ``shares[k-1]`` of all images with the highest sigma_bar there at the previous factor; its
    threshold sits halfway between the last image that stops and the first that passes.
    """
    if len(shares) != len(factors) or any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"shares {list(shares)} must be {len(factors)} non-negative numbers summing to 1")
    total = len(profiles)
    remaining = list(range(total))
    thresholds: dict[int, float] = {}
    for k in range(1, len(factors)):
        factor = factors[k]
        stop = min(len(remaining), round(shares[k - 1] * total))
        ordered = sorted(remaining, key=lambda i: profiles[i][factor])  # most compressible first
        passing = ordered[: len(ordered) - stop]
        if not passing:  # nobody steps up: just below the smallest value
            lowest = min((profiles[i][factor] for i in ordered), default=0.0)
            thresholds[factor] = lowest - max(1e-9, abs(lowest) * 1e-6)
        elif len(passing) == len(ordered):
            thresholds[factor] = profiles[ordered[-1]][factor] * 2 + 1e-6
        else:
            last, first = profiles[passing[-1]][factor], profiles[ordered[len(passing)]][factor]
            # Halfway, unless the two are adjacent floats and halfway rounds onto the one that stops.
            middle = (last + first) / 2
            thresholds[factor] = middle if middle < first else last
        remaining = passing
    return thresholds


class DynamicFeatureMapReduction:
    name: ClassVar[str] = "dfmr"
    summary: ClassVar[str] = "LLaVA-Zip: per-image pooling factor from the image's own feature variability"
    params: ClassVar[tuple[ParamSpec, ...]] = (
        ParamSpec(
            "factors", str, "1,2,3", description="candidate pooling factors, ascending (576/144/64 tokens on 24x24)"
        ),
        ParamSpec(
            "tau",
            float,
            None,
            minimum=0.0,
            description="threshold for every step; default: the pack's calibration, else 5e-2",
        ),
        ParamSpec(
            "feature_norm",
            str,
            "layernorm",
            choices=FEATURE_NORMS,
            description="normalisation before the metric",
        ),
        ParamSpec(
            "force_factor",
            int,
            0,
            minimum=0,
            maximum=64,
            description="pool with this factor regardless of the image; 0 = adaptive",
        ),
    )
    needs: ClassVar[frozenset[CompressorInput]] = frozenset({CompressorInput.PATCH_FEATURES})
    output_space: ClassVar[OutputSpace] = OutputSpace.VISION
    calibration_params: ClassVar[tuple[ParamSpec, ...]] = (
        ParamSpec("share", str, "", description="target share per factor, e.g. 0.34,0.33,0.33 (default: equal)"),
        ParamSpec("factors", str, "1,2,3", description="the candidate pooling factors to calibrate, ascending"),
        ParamSpec(
            "feature_norm",
            str,
            "layernorm",
            choices=FEATURE_NORMS,
            description="normalisation before the metric; requests with another one ignore the thresholds",
        ),
    )

    def __init__(self) -> None:
        self.calibrated: dict[int, float] = {}  # factor -> threshold, from the pack
        self.calibrated_norm = "layernorm"  # the feature_norm the calibration was made with

    def calibrate(self, samples: Iterable[ImageFeatures], params: Mapping[str, Any]) -> Calibration:
        """Thresholds under which ``samples`` split across the factors in the asked shares."""
        factors = parse_factors(params["factors"], "calibration option factors")
        shares = parse_shares(params["share"], factors)
        analysis = resolve_params(self, {"factors": params["factors"], "feature_norm": params["feature_norm"]})
        profiles = [self.analyse(features, analysis) for features in samples]
        if not profiles:
            raise InvalidRequest("compressor 'dfmr' needs at least one image to calibrate on")
        try:
            thresholds = calibrate(profiles, factors, shares)
        except ValueError as exc:
            raise InvalidRequest(f"calibration option share: {exc}") from None
        chosen = {factor: 0 for factor in factors}
        for profile in profiles:
            chosen[choose_factor(profile, factors, thresholds)] += 1
        return Calibration(
            data={
                "thresholds": {str(factor): tau for factor, tau in thresholds.items()},
                "factors": list(factors),
                "feature_norm": params["feature_norm"],
                "shares": shares,
                "images": len(profiles),
            },
            summary=f"thresholds {thresholds}",
            details=("factor shares: " + ", ".join(f"{f}: {chosen[f]}/{len(profiles)}" for f in factors),),
        )

    def load_calibration(self, data: Mapping[str, Any]) -> None:
        """Thresholds by factor, and the feature_norm they were measured with."""
        try:
            self.calibrated = {int(factor): float(tau) for factor, tau in data["thresholds"].items()}
        except (KeyError, AttributeError, TypeError, ValueError):
            raise LoadError(
                "dfmr calibration: 'thresholds' must map factors to numbers, e.g. {\"2\": 0.05}; "
                "write it again with `squint calibrate dfmr`"
            ) from None
        self.calibrated_norm = data.get("feature_norm", "layernorm")
        logger.info("dfmr: calibrated thresholds %s (feature_norm %s)", self.calibrated, self.calibrated_norm)

    def thresholds(self, factors: Sequence[int], tau: float | None, feature_norm: str) -> dict[int, float]:
        if tau is not None:
            return {factor: tau for factor in factors}
        # Calibrated thresholds mean something only on the features they were measured on.
        calibrated = self.calibrated if feature_norm == self.calibrated_norm else {}
        return {factor: calibrated.get(factor, PAPER_TAU) for factor in factors}

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int | None:
        check_grid(self.name, grid)
        if params["force_factor"]:
            self._check_factor(grid, params["force_factor"])
            return (grid[0] // params["force_factor"]) ** 2
        parse_factors(params["factors"])
        return None  # depends on the image

    def analyse(self, features: ImageFeatures, params: Mapping[str, Any]) -> dict[int, float]:
        """sigma_bar for every candidate factor: the image's complexity profile."""
        side = features.grid[0]
        grid = normalise(features.patch_features, params["feature_norm"]).T.reshape(-1, side, side)  # [d, side, side]
        return {p: mean_window_std(grid, p) for p in parse_factors(params["factors"]) if p <= side}

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        return self._compress(features, params, budget=None)

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage:
        """Step the factor up (docs/methods.md §1.4) until the tokens fit ``budget``."""
        return self._compress(features, params, budget=budget)

    def token_levels(self, grid: tuple[int, int], params: Mapping[str, Any], natural: int) -> tuple[int, ...]:
        """The natural count, then every larger factor's (the image's choice can only step up)."""
        if params["force_factor"]:
            return (natural,)
        side = grid[0]
        counts = {(side // p) ** 2 for p in range(1, side + 1)}
        return tuple(sorted((c for c in counts if c <= natural), reverse=True))

    def _compress(self, features: ImageFeatures, params: Mapping[str, Any], budget: int | None) -> CompressedImage:
        check_grid(self.name, features.grid)
        side = features.grid[0]
        sigmas = self.analyse(features, params)
        factors = [p for p in parse_factors(params["factors"]) if p <= side]
        if not factors:
            raise InvalidRequest(
                f"compressor.params.factors {params['factors']!r}: none fits this image's {side}x{side} grid"
            )
        if params["force_factor"]:
            factor = params["force_factor"]
            self._check_factor(features.grid, factor)
        else:
            factor = choose_factor(sigmas, factors, self.thresholds(factors, params["tau"], params["feature_norm"]))
        chosen_by_image = factor
        if budget is not None and params["force_factor"] and (side // factor) ** 2 > budget:
            raise BudgetExceeded(
                f"compressor 'dfmr' with force_factor {factor} emits "
                f"{(side // factor) ** 2} tokens; the budget allows {budget}"
            )
        if budget is not None:
            # Every factor above the image's choice, listed or not: what token_levels offers.
            while (side // factor) ** 2 > budget and factor < side:
                factor += 1
        tokens = pool_tokens_2d(features.patch_features, side, factor)  # [(side // s)^2, d], raster order
        second = factors[1] if len(factors) > 1 else factors[0]
        return CompressedImage(
            tokens=tokens.contiguous(),
            covers=window_covers(side, factor),
            complexity=sigmas.get(second, 0.0),
            notes={
                "factor": factor,
                "factor_chosen_by_image": chosen_by_image,
                "sigma_bar": {str(p): s for p, s in sigmas.items()},
                "dropped_edge_patches": side % factor,
            },
        )

    def _check_factor(self, grid: tuple[int, int], factor: int) -> None:
        if factor > grid[0]:
            raise InvalidRequest(
                f"compressor.params.force_factor is {factor}; "
                f"the maximum for this image's {grid[0]}x{grid[1]} grid is {grid[0]}"
            )


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(DynamicFeatureMapReduction)
