"""``none``: LLaVA-1.5 as published — every patch token, unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from compressor_plugins import hookimpl
from compressor_plugins.protocol import CompressedImage, CompressorInput, ImageFeatures, OutputSpace, ParamSpec


class NoCompression:
    name: ClassVar[str] = "none"
    summary: ClassVar[str] = "every patch token, as LLaVA-1.5 (the baseline)"
    params: ClassVar[tuple[ParamSpec, ...]] = ()
    needs: ClassVar[frozenset[CompressorInput]] = frozenset({CompressorInput.PATCH_FEATURES})
    output_space: ClassVar[OutputSpace] = OutputSpace.VISION

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        return grid[0] * grid[1]

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        tokens = features.patch_features  # [n, d]
        return CompressedImage(tokens=tokens, covers=tuple((i,) for i in range(tokens.shape[0])))


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(NoCompression)
