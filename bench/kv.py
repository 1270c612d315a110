"""What a request holds in the LLM's KV cache, from its token counts and the pack's shape."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.settings import Case


@dataclass(frozen=True)
class KVShape:
    """What one token costs in the LLM's KV cache, per layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of_pack(cls, llava_dir: Path, dtype_bytes: int) -> KVShape:
        text = json.loads((llava_dir / "config.json").read_text())["text_config"]
        heads = text["num_attention_heads"]
        return cls(
            layers=text["num_hidden_layers"],
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or text["hidden_size"] // heads,
            dtype_bytes=dtype_bytes,
        )

    @property
    def per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes  # K and V


def kv_bytes(shape: KVShape, prompt_tokens: int, completion_tokens: int, pooled: Sequence[tuple[int, int]] = ()) -> int:
    """K and V bytes held for a request when it ends: every layer holds the prompt and the
    generated tokens but the last (never fed back); ``pooled`` lists (layer K, tokens removed)
    for image spans pooled inside the LLM, which layers K and above hold shortened."""
    length = prompt_tokens + max(completion_tokens - 1, 0)
    total = 0
    for layer in range(shape.layers):
        held = length - sum(removed for k, removed in pooled if layer >= k)
        total += held * shape.per_token_layer
    return total


def in_llm_pooling(case: Case, grid_tokens: int) -> list[tuple[int, int]]:
    """(layer K, tokens removed) when ``case`` pools its image of ``grid_tokens`` (a square grid)
    inside the LLM, else [].

    The count is the compressor's own: pooling at layer K keeps the tokens that the same
    windows keep before the LLM, which is what ``staged_pool`` predicts for layer -1.
    """
    if case.compressor != "staged_pool":
        return []
    from compressor_plugins.builtin.staged_pool import StagedPooling
    from compressor_plugins.protocol import resolve_params

    params = resolve_params(StagedPooling, dict(case.params))
    if params["layer"] < 0:
        return []
    side = math.isqrt(grid_tokens)
    kept = StagedPooling().predict_tokens((side, side), {**params, "layer": -1})
    return [(params["layer"], grid_tokens - kept)]
