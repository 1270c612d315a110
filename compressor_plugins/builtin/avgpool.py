"""``avgpool``: plain 2-D average pooling of the patch grid with a stride.

The s x s windows of the square grid are averaged (``avg_pool2d`` with kernel = stride = s,
floor mode: a partial last row or column is dropped) and read in raster order, so a 24 x 24
grid gives 144 tokens at s = 2 and 64 at s = 3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from compressor_plugins import hookimpl
from compressor_plugins.pooling import pool_tokens_2d, window_covers
from compressor_plugins.protocol import (
    CompressedImage,
    CompressorInput,
    ImageFeatures,
    OutputSpace,
    ParamSpec,
    check_grid,
)
from squint.errors import InvalidRequest


class AvgPool2d:
    name: ClassVar[str] = "avgpool"
    summary: ClassVar[str] = "2-D average pooling of the patch grid with stride s: (side // s)^2 tokens"
    params: ClassVar[tuple[ParamSpec, ...]] = (
        ParamSpec("stride", int, 2, minimum=1, maximum=64, description="window side and step, in patches"),
    )
    needs: ClassVar[frozenset[CompressorInput]] = frozenset({CompressorInput.PATCH_FEATURES})
    output_space: ClassVar[OutputSpace] = OutputSpace.VISION

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        self._check(grid, params["stride"])
        return (grid[0] // params["stride"]) ** 2

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        stride = params["stride"]
        side, _ = features.grid
        self._check(features.grid, stride)
        tokens = pool_tokens_2d(features.patch_features, side, stride)  # [(side // s)^2, d], raster order
        return CompressedImage(
            tokens=tokens.contiguous(),
            covers=window_covers(side, stride),
            notes={"dropped_edge_patches": side % stride},
        )

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage:
        """The requested stride, or the smallest larger one whose output fits ``budget``."""
        side = features.grid[0]
        stride = params["stride"]
        while (side // stride) ** 2 > budget and stride < side:
            stride += 1
        return self.compress(features, {**params, "stride": stride})

    def token_levels(self, grid: tuple[int, int], params: Mapping[str, Any], natural: int) -> tuple[int, ...]:
        side = grid[0]
        counts = {(side // s) ** 2 for s in range(params["stride"], side + 1)}
        return tuple(sorted(counts, reverse=True))

    def _check(self, grid: tuple[int, int], stride: int) -> None:
        check_grid(self.name, grid)
        if stride > grid[0]:
            raise InvalidRequest(
                f"compressor.params.stride is {stride}; the maximum for "
                f"this image's {grid[0]}x{grid[1]} grid is {grid[0]}"
            )


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(AvgPool2d)
