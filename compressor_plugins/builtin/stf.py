"""``stf``: LLaVA-STF's Multi-Block Token Fusion + Spatial Token Fusion (docs/methods.md §3).

Replaces the LLaVA projector, so its tokens are already in LLM space:

1. MBTF: the patch rows (CLS dropped) of 8 CLIP hidden states -- blocks 23, 21, 18, 15, 12, 9,
   6, 3 of a 24-block CLIP, deepest first -- are concatenated along channels and fused per token
   by Linear(8C -> 4C), exact GELU, Linear(4C -> C). No activation after the second linear.
2. STF: the fused [side, side, C] grid is cut into non-overlapping 2x2 windows, read in raster
   order; each window becomes one 4C vector laid out **channel-major** (index c*4 + dy*2 + dx),
   the layout the released weights were trained with.
3. Projector: Linear(4C -> 16C), exact GELU, Linear(16C -> H). A 24 x 24 grid gives 144 tokens.

Modes. The default is the paper's intent: a grid must be square with an even side. With
``reference_mode`` the released code's behaviour is kept: an odd side silently drops the last
row and column (5 x 5 -> 4 tokens). Both modes reject non-square grids (the released code
crashes on them) and grids smaller than one window.

Weights come from the pack (manifest ``compressors.stf``): safetensors under the released
names (``model.mm_projector_crosslayer.{0,2}.*``, ``model.mm_projector.{0,2}.*``; see
:func:`read_state`) and an optional ``config.json`` with the block list, ``{"blocks": [...]}``,
for a CLIP of another depth. C and H are read from the tensor shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from torch import nn

from compressor_plugins import hookimpl
from compressor_plugins.pooling import window_covers
from compressor_plugins.protocol import (
    CompressedImage,
    CompressorInput,
    ImageFeatures,
    LoadError,
    OutputSpace,
    ParamSpec,
    check_grid,
)
from squint.errors import InvalidRequest, Unsupported

# hidden_states indices the released model fuses, in concatenation order (24-block CLIP).
# Index 23 is hidden_states[-2], LLaVA's usual feature layer; block 24 is never used.
RELEASED_BLOCKS: tuple[int, ...] = (23, 21, 18, 15, 12, 9, 6, 3)
RELEASED_CLIP_BLOCKS = 24
CONFIG_NAME = "config.json"

# The module's own parameter names, which are the released ones without a prefix.
MBTF, PROJECTOR = "mm_projector_crosslayer", "mm_projector"
WEIGHT_NAMES: tuple[str, ...] = tuple(
    f"{module}.{index}.{kind}" for module in (MBTF, PROJECTOR) for index in (0, 2) for kind in ("weight", "bias")
)
# Released checkpoints prefix them with "model." (LlavaLlamaForCausalLM), PEFT wraps that in
# "base_model.model."; plain names are accepted too. Other tensors in the folder (a full
# LLaVA-STF checkpoint's LLM) are ignored: only names under mm_projector* are ours.
_NAME = re.compile(r"^(?:base_model\.)?(?:model\.){0,2}(mm_projector(?:_crosslayer)?\..+)$")


@dataclass(frozen=True)
class STFConfig:
    """The sizes of one STF checkpoint.

    C = ``vision_width`` (CLIP width), k = ``len(blocks)`` fused hidden states, H = ``llm_width``.
    The released model has mbtf_hidden = 4C and projector_hidden = 16C.
    """

    vision_width: int  # C
    llm_width: int  # H
    blocks: tuple[int, ...] = RELEASED_BLOCKS  # hidden_states indices, concatenated in this order
    mbtf_hidden: int | None = None  # default 4C
    projector_hidden: int | None = None  # default 16C

    @property
    def mbtf_width(self) -> int:
        return self.mbtf_hidden or 4 * self.vision_width

    @property
    def projector_width(self) -> int:
        return self.projector_hidden or 16 * self.vision_width

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every weight, by its plain name."""
        c, k, h = self.vision_width, len(self.blocks), self.llm_width
        return {
            f"{MBTF}.0.weight": (self.mbtf_width, k * c),
            f"{MBTF}.0.bias": (self.mbtf_width,),
            f"{MBTF}.2.weight": (c, self.mbtf_width),
            f"{MBTF}.2.bias": (c,),
            f"{PROJECTOR}.0.weight": (self.projector_width, 4 * c),
            f"{PROJECTOR}.0.bias": (self.projector_width,),
            f"{PROJECTOR}.2.weight": (h, self.projector_width),
            f"{PROJECTOR}.2.bias": (h,),
        }


def concat_blocks(hidden_states: Sequence[torch.Tensor], blocks: Sequence[int]) -> torch.Tensor:
    """MBTF input: each chosen hidden state [1 + n, C], CLS dropped, concatenated -> [n, k*C].

    Channels 0..C-1 come from ``blocks[0]``, C..2C-1 from ``blocks[1]``, and so on.
    """
    return torch.cat([hidden_states[block][1:] for block in blocks], dim=-1)


def depth_mismatch(blocks: Sequence[int], hidden_state_count: int, blocks_from_config: bool) -> str | None:
    """Why ``blocks`` cannot be fused from a CLIP giving ``hidden_state_count`` hidden states
    (its blocks + 1, index 0 the embeddings), or None when they can. The compressor checks it at
    serve time and ``squint train --stf`` before its first step."""
    count = hidden_state_count
    if not blocks_from_config and count != RELEASED_CLIP_BLOCKS + 1:
        return (
            f"the released block list {list(blocks)} is for a {RELEASED_CLIP_BLOCKS}-block CLIP, this CLIP has "
            f"{count - 1} blocks; write the blocks its weights were trained on into {CONFIG_NAME} of the pack's "
            f'stf folder, e.g. {{"blocks": [...]}}'
        )
    out_of_range = [block for block in blocks if not -count <= block < count]
    if out_of_range:
        return (
            f"its weights fuse hidden_states {list(blocks)}, but this CLIP gives only {count} hidden states "
            f"({count - 1} blocks): {out_of_range} out of range; fix 'blocks' in {CONFIG_NAME} of the pack's "
            f"stf folder"
        )
    return None


def group_windows(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """STF grouping: [side*side, C] in raster order -> [(side//2)^2, 4C], channel-major windows.

    An odd side loses its last row and column, as in the released code.
    """
    c = tokens.shape[-1]
    half = side // 2
    grid = tokens.reshape(side, side, c)[: 2 * half, : 2 * half]  # [2h, 2h, C]
    windows = grid.reshape(half, 2, half, 2, c)  # [wr, dy, wc, dx, C]
    windows = windows.permute(0, 2, 4, 1, 3)  # [wr, wc, C, dy, dx]: channel-major inside a window
    return windows.reshape(half * half, 4 * c)  # [h^2, 4C], element c*4 + dy*2 + dx


class STFModel(nn.Module):
    """MBTF, STF grouping and the projector. Parameter names are the released ones."""

    def __init__(self, config: STFConfig) -> None:
        super().__init__()
        self.config = config
        c, k = config.vision_width, len(config.blocks)
        self.mm_projector_crosslayer = nn.Sequential(  # MBTF, a 1x1 conv per token
            nn.Linear(k * c, config.mbtf_width),
            nn.GELU(),  # exact (erf), as released
            nn.Linear(config.mbtf_width, c),
        )
        self.mm_projector = nn.Sequential(  # LLaVA's mlp2x_gelu on the 4C windows
            nn.Linear(4 * c, config.projector_width),
            nn.GELU(),
            nn.Linear(config.projector_width, config.llm_width),
        )

    def forward(self, concat: torch.Tensor, side: int) -> torch.Tensor:
        """[side*side, k*C] -> [(side//2)^2, H]."""
        fused = self.mm_projector_crosslayer(concat)  # [n, C]
        grouped = group_windows(fused, side)  # [m, 4C]
        return self.mm_projector(grouped)  # [m, H]


def read_config(folder: Path) -> tuple[int, ...] | None:
    """The block list of ``folder/config.json``, or ``None`` when the file or its key is absent.

    Other keys are ignored, so the folder may also be a full LLaVA-STF checkpoint.
    """
    path = folder / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LoadError(f"stf weights: {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "blocks" not in config:
        return None
    blocks = config["blocks"]
    if (
        not isinstance(blocks, list)
        or not blocks
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
    ):
        raise LoadError(
            f"stf weights: {path}: 'blocks' must be a non-empty list of hidden_states indices, "
            f"e.g. {list(RELEASED_BLOCKS)}; got {blocks!r}"
        )
    return tuple(blocks)


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    """The STF tensors of every ``*.safetensors`` file in ``folder``, by plain name.

    Accepted: ``mm_projector[_crosslayer].*`` with an optional ``base_model.`` and up to two
    ``model.`` prefixes. Anything else in the files is ignored.
    """
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(
            f"stf weights: {folder} has no .safetensors files; save the MBTF and projector weights "
            f"(released names {WEIGHT_NAMES[0]!r} ...) as safetensors"
        )
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                match = _NAME.match(name)
                if match is None:
                    continue
                plain = match.group(1)
                if plain in source:
                    raise LoadError(
                        f"stf weights in {folder}: {source[plain]!r} and "
                        f"{path.name}:{name!r} are both {plain!r}; keep one"
                    )
                state[plain], source[plain] = handle.get_tensor(name), f"{path.name}:{name}"
    return state


def infer_config(folder: Path, state: Mapping[str, torch.Tensor], blocks: tuple[int, ...] | None) -> STFConfig:
    """Sizes from the tensor shapes; every name and shape checked, mismatches named."""
    missing = [name for name in WEIGHT_NAMES if name not in state]
    unexpected = sorted(set(state) - set(WEIGHT_NAMES))
    if missing or unexpected:
        raise LoadError(
            f"stf weights in {folder} do not fit: missing {missing}, unexpected {unexpected} "
            f"(names may carry a 'model.' and/or 'base_model.' prefix); expected {list(WEIGHT_NAMES)}"
        )
    mbtf_in = state[f"{MBTF}.0.weight"]  # [4C, k*C]
    mbtf_out = state[f"{MBTF}.2.weight"]  # [C, 4C]
    proj_in = state[f"{PROJECTOR}.0.weight"]  # [16C, 4C]
    proj_out = state[f"{PROJECTOR}.2.weight"]  # [H, 16C]
    if any(tensor.ndim != 2 for tensor in (mbtf_in, mbtf_out, proj_in, proj_out)):
        raise LoadError(f"stf weights in {folder}: every .weight must be 2-D (a Linear's [out, in])")
    c = mbtf_out.shape[0]
    k, rest = divmod(mbtf_in.shape[1], c)
    if rest:
        raise LoadError(
            f"stf weights in {folder}: {MBTF}.0.weight is {list(mbtf_in.shape)}, its input width is not a "
            f"multiple of the fused width C = {c} (from {MBTF}.2.weight {list(mbtf_out.shape)})"
        )
    if blocks is None:
        blocks = RELEASED_BLOCKS
    if len(blocks) != k:
        raise LoadError(
            f"stf weights in {folder}: {MBTF}.0.weight {list(mbtf_in.shape)} fuses {k} hidden states of width {c}, "
            f"but the block list {list(blocks)} names {len(blocks)}; fix 'blocks' in {folder / CONFIG_NAME}"
        )
    config = STFConfig(
        vision_width=c,
        llm_width=proj_out.shape[0],
        blocks=tuple(blocks),
        mbtf_hidden=mbtf_in.shape[0],
        projector_hidden=proj_in.shape[0],
    )
    wrong = [
        f"{name} is {list(state[name].shape)}, expected {list(shape)}"
        for name, shape in config.shapes().items()
        if tuple(state[name].shape) != shape
    ]
    if wrong:
        raise LoadError(f"stf weights in {folder} have inconsistent shapes (C = {c}): {'; '.join(wrong)}")
    return config


class SpatialTokenFusion:
    name: ClassVar[str] = "stf"
    summary: ClassVar[str] = (
        "LLaVA-STF: fuse 8 CLIP blocks per token, then 2x2 windows, replacing the projector: (side/2)^2 tokens"
    )
    params: ClassVar[tuple[ParamSpec, ...]] = (
        ParamSpec(
            "reference_mode",
            bool,
            False,
            description="the released code exactly: an odd grid side drops its last row and column "
            "instead of being refused",
        ),
    )
    needs: ClassVar[frozenset[CompressorInput]] = frozenset({CompressorInput.HIDDEN_STATES})
    output_space: ClassVar[OutputSpace] = OutputSpace.LLM

    def __init__(self) -> None:
        self.model: STFModel | None = None
        self.blocks_from_config = False  # True: the folder's config.json chose the blocks

    def load_weights(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        """Read the MBTF and projector weights (and the optional block list) from ``folder``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise LoadError(f"stf weights: {folder} is not a folder")
        blocks = read_config(folder)
        state = read_state(folder)
        config = infer_config(folder, state, blocks)
        model = STFModel(config)
        model.load_state_dict(state, strict=True)  # names and shapes were checked above
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.blocks_from_config = blocks is not None

    def predict_tokens(self, grid: tuple[int, int], params: Mapping[str, Any]) -> int:
        self._check_grid(grid, params["reference_mode"])
        return (grid[0] // 2) ** 2

    def compress(self, features: ImageFeatures, params: Mapping[str, Any]) -> CompressedImage:
        model = self._require_model()
        self._check_grid(features.grid, params["reference_mode"])
        side = features.grid[0]
        blocks = self._blocks(model, features)
        weight = model.mm_projector[0].weight
        concat = concat_blocks(features.hidden_states, blocks).to(weight.device, weight.dtype)  # [n, k*C]
        tokens = model(concat, side)  # [(side//2)^2, H]
        return CompressedImage(
            tokens=tokens,
            covers=window_covers(side, 2),
            notes={"blocks": list(blocks), "dropped_edge_patches": side % 2},
        )

    def _require_model(self) -> STFModel:
        if self.model is None:
            raise Unsupported(
                "compressor 'stf' has no weights: it replaces the LLaVA projector with learned MBTF + projector "
                "weights, and this server's model pack names no folder for them (manifest 'compressors': "
                "{'stf': ...}); the worker serves stf only when the pack provides its weights"
            )
        return self.model

    def _check_grid(self, grid: tuple[int, int], reference_mode: bool) -> None:
        check_grid(self.name, grid, min_side=2)  # square, and at least one 2x2 window
        if grid[0] % 2 and not reference_mode:
            raise InvalidRequest(
                f"compressor 'stf' fuses 2x2 windows and needs an even grid side; this image gives "
                f"{grid[0]}x{grid[1]} (reference_mode: true drops the last row and column, as the released code does)"
            )

    def _blocks(self, model: STFModel, features: ImageFeatures) -> tuple[int, ...]:
        """The hidden_states indices to fuse for this CLIP, checked against its depth."""
        hidden_states = features.hidden_states
        if hidden_states is None:
            raise RuntimeError("compressor 'stf' needs every CLIP hidden state; the vision worker passed none")
        # The pack's weights do not fit its CLIP: nothing the client can change, said without paths.
        mismatch = depth_mismatch(model.config.blocks, len(hidden_states), self.blocks_from_config)
        if mismatch:
            raise Unsupported(f"compressor 'stf' cannot run on this server: {mismatch}")
        blocks = model.config.blocks
        rows, cols = features.grid
        expected = (1 + rows * cols, model.config.vision_width)
        for block in blocks:
            if tuple(hidden_states[block].shape) != expected:
                raise Unsupported(
                    f"compressor 'stf' cannot run on this server: its weights expect hidden states of shape "
                    f"{list(expected)} (CLS + {rows}x{cols} patches, C = {model.config.vision_width}); "
                    f"hidden_states[{block}] is {list(hidden_states[block].shape)}"
                )
        return blocks


@hookimpl
def squint_register_compressors(registry) -> None:
    registry.register(SpatialTokenFusion)
