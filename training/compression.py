"""Compression while training, with the compressors' own code.

LLaVA-Zip trains LLaVA-1.5 with DFMR pooling its visual tokens (docs/methods.md §1.5): ``random``
draws each sample's factor uniformly from the candidates ("LLaVA-1.5 Random"), ``dynamic`` lets
the picture choose by its σ̄ as at inference ("LLaVA-1.5 DFMR"). Both call the ``dfmr`` compressor
itself — the instance the vision worker would create from the pack (its calibration included) —
so training pools exactly as serving will.

LLaVolta trains in stages (docs/methods.md §2.6): heavy pooling first, lighter pooling deeper in
the LLM next, none at the end. A stage pools with the ``staged_pool`` compressor (before the LLM,
or a directive for layer K) and the LLM engine's own layer-by-layer decoder
(:class:`llm_worker.staged.StagedDecoder`), which pools the span at the entry of layer K.

LLaVA-STF learns its fusion with the LLM: ``--stf`` trains the ``stf`` compressor's own module in
place of LLaVA's projector and writes its weights back to the pack's ``stf`` folder.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from compressor_plugins.builtin.dfmr import parse_factors
from compressor_plugins.builtin.stf import concat_blocks, depth_mismatch
from compressor_plugins.protocol import ImageFeatures, LLMDirective, create_compressor, resolve_params
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


# --------------------------------------------------------------------------- LLaVolta


@dataclass(frozen=True)
class LlavoltaStage:
    """One stage of LLaVolta's schedule: pool at decoder layer ``layer`` with ``stride`` (``layer``
    None: uncompressed; -1: before the LLM) for ``share`` of the training steps."""

    layer: int | None
    stride: int
    share: float

    def __str__(self) -> str:
        return "none" if self.layer is None else f"layer {self.layer}, stride {self.stride}"


def parse_llavolta(schedule: str) -> tuple[LlavoltaStage, ...]:
    """``"K:S:SHARE,...,none:SHARE"``, e.g. the released 4-stage script on a 32-layer LLM:
    ``2:8:0.25,2:2:0.25,16:2:0.25,none:0.25``. Shares add up to 1; the last stage is uncompressed
    (LLaVolta's models are served uncompressed after it)."""
    stages = []
    for part in schedule.split(","):
        fields = part.strip().split(":")
        try:
            if fields[0] == "none" and len(fields) == 2:
                stages.append(LlavoltaStage(None, 1, float(fields[1])))
            elif len(fields) == 3:
                stages.append(LlavoltaStage(int(fields[0]), int(fields[1]), float(fields[2])))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"--llavolta stage {part.strip()!r} is not LAYER:STRIDE:SHARE or none:SHARE "
                "(e.g. 2:8:0.25,2:2:0.25,16:2:0.25,none:0.25)"
            ) from None
    for stage in stages:
        if stage.share <= 0 or (stage.layer is not None and (stage.layer < -1 or stage.stride < 2)):
            raise ValueError(f"--llavolta stage {stage}: layer >= -1, stride >= 2 and a share > 0")
    if abs(sum(s.share for s in stages) - 1.0) > 1e-6:
        raise ValueError(f"--llavolta shares add up to {sum(s.share for s in stages):g}, not 1")
    if stages[-1].layer is not None:
        raise ValueError("--llavolta: the last stage is uncompressed (none:SHARE), as in LLaVolta's schedules")
    return tuple(stages)


def check_layers(stages: tuple[LlavoltaStage, ...], n_layers: int) -> None:
    """Every stage's layer K is one of the LLM's decoder layers (a K beyond them would never pool)."""
    for stage in stages:
        if stage.layer is not None and stage.layer >= n_layers:
            raise ValueError(f"--llavolta stage {stage}: the LLM has {n_layers} decoder layers (0..{n_layers - 1})")


class LlavoltaTraining:
    """Which stage a training step is in, and each picture's tokens and directive in that stage
    from the ``staged_pool`` compressor itself (the instance the vision worker would create)."""

    def __init__(self, stages: tuple[LlavoltaStage, ...], total_steps: int, n_layers: int, pack) -> None:
        check_layers(stages, n_layers)
        self.stages = stages
        # Stage i runs from pivot i-1 (0 for the first) to pivot i, in optimizer steps.
        shares = itertools.accumulate(s.share for s in stages)
        self.pivots = tuple(round(total * total_steps) for total in shares)
        entry = load_compressors(PluginSettings()).get("staged_pool")
        self.compressor = create_compressor(
            entry.cls, pack.compressor_dirs.get("staged_pool"), torch.device("cpu"), torch.float32
        )

    def stage_at(self, step: int) -> LlavoltaStage:
        """The stage of 0-based optimizer step ``step`` (the last one past the end)."""
        return next((s for s, pivot in zip(self.stages, self.pivots, strict=True) if step < pivot), self.stages[-1])

    def compress(
        self, features: torch.Tensor, projected: torch.Tensor, grid: tuple[int, int], stage: LlavoltaStage
    ) -> tuple[torch.Tensor, LLMDirective | None]:
        """One picture in a compressed stage: the rows spliced into the prompt and the in-LLM directive."""
        params = resolve_params(self.compressor, {"layer": stage.layer, "stride": stage.stride})
        compressed = self.compressor.compress(ImageFeatures(features, grid, llm_tokens=projected), params)
        return compressed.tokens, compressed.directive


# --------------------------------------------------------------------------- STF


class STFTraining:
    """LLaVA-STF's learned fusion, trained: the ``stf`` compressor's own module (MBTF, 2 x 2
    grouping, projector), loaded from the pack as the vision worker loads it, made trainable, and
    written back where the compressor reads it (``save``)."""

    def __init__(self, pack, vision_depth: int) -> None:
        folder = pack.compressor_dirs.get("stf")
        if folder is None:
            raise ValueError(
                "--stf trains the pack's stf weights, and this pack names none (manifest 'compressors': "
                "{'stf': ...}); `squint pack tiny` and `squint pack world` write them"
            )
        entry = load_compressors(PluginSettings()).get("stf")
        self.compressor = create_compressor(entry.cls, folder, torch.device("cpu"), torch.float32)
        self.folder = Path(folder)
        self.model = self.compressor.model.train().requires_grad_(True)
        self.blocks = self.model.config.blocks
        # Checked before any step, as the compressor checks it at serve time.
        mismatch = depth_mismatch(self.blocks, vision_depth + 1, self.compressor.blocks_from_config)
        if mismatch:
            raise ValueError(f"--stf cannot train this pack's stf weights: {mismatch}")

    def features(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """MBTF's input for one picture: its chosen blocks' patch rows side by side [n, k*C]."""
        return concat_blocks(hidden_states, self.blocks)

    def tokens(self, grid: tuple[int, int]) -> int:
        """Visual tokens of a picture (one per 2 x 2 window), as the compressor predicts them."""
        return self.compressor.predict_tokens(grid, resolve_params(self.compressor, {}))

    def save(self) -> None:
        """The trained weights, under the names ``stf`` reads, replacing the folder's safetensors."""
        state = {name: tensor.detach().contiguous() for name, tensor in self.model.state_dict().items()}
        for old in self.folder.glob("*.safetensors"):
            old.unlink()
        save_file(state, str(self.folder / "model.safetensors"))
