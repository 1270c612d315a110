"""``avgpool``: plain 2-D average pooling of the patch grid with a stride.

The s x s windows of the square grid are averaged (``avg_pool2d`` with kernel = stride = s,
floor mode: a partial last row or column is dropped) and read in raster order, so a 24 x 24
grid gives 144 tokens at s = 2 and 64 at s = 3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch.nn.functional as F

from compressor_plugins import hookimpl
from compressor_plugins.protocol import (
    CompressedImage,
    CompressorInput,
    ImageFeatures,
    OutputSpace,
    ParamSpec,
    check_grid,
)
from squint.errors import InvalidRequest


def window_covers(side: int, stride: int) -> tuple[tuple[int, ...], ...]:
    """Raster indices of the patches under each s x s window of a square grid, windows in raster order."""
    pooled = side // stride
    return tuple(
        tuple((wr * stride + dr) * side + (wc * stride + dc) for dr in range(stride) for dc in range(stride))
        for wr in range(pooled)
        for wc in range(pooled)
    )


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
        d = features.patch_features.shape[-1]
        grid = features.patch_features.T.reshape(1, d, side, side)  # [1, d, side, side]
        pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)  # [1, d, side // s, side // s]
        tokens = pooled.flatten(2).squeeze(0).T  # [(side // s)^2, d], raster order
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
                f"compressor.params.stride is {stride}; the maximum for this image's {grid[0]}x{grid[1]} grid is {grid[0]}"
            )


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(AvgPool2d)
