"""``staged_pool``: LLaVolta's average pooling of visual tokens, before the LLM or inside it.

``layer = -1`` pools the projected tokens before they are spliced into the prompt (the paper's
K = -1): 1-D windows of ``stride`` tokens in raster order (``shape: 1d``, the paper's), or
``stride`` x ``stride`` squares (``shape: 2d``). ``layer = K >= 0`` keeps every token and asks
the LLM worker, through an in-LLM directive, to pool this image's span at the entry of decoder
layer K (docs/methods.md §2.4-2.5). ``reference_mode`` only matters in-LLM: the pooled position ids
are then the released code's float16 means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from compressor_plugins import hookimpl
from compressor_plugins.pooling import pool_tokens_1d, pool_tokens_2d, pooled_count, window_covers
from compressor_plugins.protocol import (
    CompressedImage,
    CompressorInput,
    ImageFeatures,
    LLMDirective,
    OutputSpace,
    ParamSpec,
    check_grid,
)
from squint.errors import BudgetExceeded, InvalidRequest


class StagedPooling:
    name: ClassVar[str] = "staged_pool"
    summary: ClassVar[str] = "LLaVolta average pooling: before the LLM (layer -1) or inside it at layer K"
    params: ClassVar[tuple[ParamSpec, ...]] = (
        ParamSpec("layer", int, -1, minimum=-1, maximum=1024, description="-1: before the LLM; K: at decoder layer K"),
        ParamSpec("stride", int, 4, minimum=1, maximum=4096, description="1d: window length; 2d: window side"),
        ParamSpec("shape", str, "1d", choices=("1d", "2d"), description="1d raster windows (paper) or 2d squares"),
        ParamSpec("reference_mode", bool, False, description="in-LLM positions as the released code (float16)"),
    )
    needs: ClassVar[frozenset[CompressorInput]] = frozenset({CompressorInput.LLM_TOKENS})
    output_space: ClassVar[OutputSpace] = OutputSpace.LLM

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        """Tokens spliced into the prompt; in-LLM pooling shortens them later, inside the LLM."""
        n = grid[0] * grid[1]
        self._check(grid, params)
        if params["layer"] >= 0:
            return n
        if params["shape"] == "2d":
            return (grid[0] // params["stride"]) ** 2
        return n // params["stride"]

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        self._check(features.grid, params)
        tokens = features.llm_tokens  # [n, llm_hidden]
        if tokens is None:
            raise ValueError("staged_pool needs llm_tokens; the vision worker supplies them when declared")
        n, stride, side = tokens.shape[0], params["stride"], features.grid[0]
        if params["layer"] >= 0:
            return CompressedImage(
                tokens=tokens,
                covers=tuple((i,) for i in range(n)),
                directive=LLMDirective(
                    layer=params["layer"], stride=stride, shape=params["shape"], reference_mode=params["reference_mode"]
                ),
                notes={"pooled_in_llm_to": self._in_llm_count(features.grid, params)},
            )
        if params["shape"] == "2d":
            return CompressedImage(tokens=pool_tokens_2d(tokens, side, stride), covers=window_covers(side, stride))
        pooled = pool_tokens_1d(tokens, stride)  # [n // stride, llm_hidden]
        covers = tuple(tuple(range(j * stride, (j + 1) * stride)) for j in range(pooled.shape[0]))
        return CompressedImage(tokens=pooled, covers=covers, notes={"dropped_tail": n % stride})

    def compress_within(self, features: ImageFeatures, params: Mapping[str, Any], budget: int) -> CompressedImage:
        """Before the LLM: the requested stride, or the smallest larger one that fits ``budget``.
        In the LLM the spliced span is whole, so a smaller budget cannot be met."""
        if params["layer"] >= 0:
            n = features.grid[0] * features.grid[1]
            if n > budget:
                raise BudgetExceeded(
                    f"compressor 'staged_pool' at layer {params['layer']} "
                    f"splices all {n} tokens; the budget allows {budget}"
                )
            return self.compress(features, params)
        stride = params["stride"]
        while self.predict_tokens(features.grid, {**params, "stride": stride}) > budget and stride < self._limit(
            features.grid, params
        ):
            stride += 1
        return self.compress(features, {**params, "stride": stride})

    def token_levels(self, grid: tuple[int, int], params: Mapping[str, Any], natural: int) -> tuple[int, ...]:
        if params["layer"] >= 0:
            return (natural,)
        counts = {
            self.predict_tokens(grid, {**params, "stride": s})
            for s in range(params["stride"], self._limit(grid, params) + 1)
        }
        return tuple(sorted(counts, reverse=True))

    @staticmethod
    def _limit(grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        return grid[0] if params["shape"] == "2d" else grid[0] * grid[1]

    @staticmethod
    def _in_llm_count(grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        return pooled_count(grid[0] * grid[1], params["stride"], params["shape"])

    def _check(self, grid: tuple[int, int], params: Mapping[str, Any]) -> None:
        stride = params["stride"]
        if params["shape"] == "2d":
            check_grid(self.name, grid)
        limit = self._limit(grid, params)
        if stride > limit:
            raise InvalidRequest(
                f"compressor.params.stride is {stride}; the maximum for this image's "
                f"{grid[0]}x{grid[1]} grid ({params['shape']}) is {limit}"
            )


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(StagedPooling)
