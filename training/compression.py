"""Compression while training, with the compressors' own code.

LLaVA-Zip trains LLaVA-1.5 with DFMR pooling its visual tokens (docs/methods.md §1.5): ``random``
draws each sample's factor uniformly from the candidates ("LLaVA-1.5 Random"), ``dynamic`` lets
the picture choose by its σ̄ as at inference ("LLaVA-1.5 DFMR"). Both call the ``dfmr`` compressor
itself — the instance the vision worker would create from the pack (its calibration included) —
so training pools exactly as serving will.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from compressor_plugins.builtin.dfmr import parse_factors
from compressor_plugins.protocol import ImageFeatures, create_compressor, resolve_params
from compressor_plugins.registry import PluginSettings, load_compressors

DFMR_MODES = ("random", "dynamic")

# One picture's tower features [n, d] -> the visual rows the LLM reads [k, d].
Compression = Callable[[torch.Tensor], torch.Tensor]


class DFMRTraining:
    """A picture's features pooled by the ``dfmr`` compressor, its factor drawn or chosen."""

    def __init__(self, mode: str, pack, grid: tuple[int, int], seed: int = 0, factors: str = "1,2,3") -> None:
        if mode not in DFMR_MODES:
            raise ValueError(f"--dfmr {mode!r} is not one of {', '.join(DFMR_MODES)}")
        entry = load_compressors(PluginSettings()).get("dfmr")
        self.compressor = create_compressor(
            entry.cls, pack.compressor_dirs.get("dfmr"), torch.device("cpu"), torch.float32
        )
        self.params = resolve_params(self.compressor, {"factors": factors})
        self.factors = [f for f in parse_factors(factors) if f <= grid[0]]
        self.mode = mode
        self.grid = grid
        self.rng = random.Random(seed)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        params = self.params
        if self.mode == "random":
            params = {**params, "force_factor": self.rng.choice(self.factors)}
        return self.compressor.compress(ImageFeatures(patch_features=features, grid=self.grid), params).tokens
