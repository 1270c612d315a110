"""``stf``: the released code's numbers (golden data), the paper's operator, edges, weights, tiny packs."""

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPModel

from compressor_plugins.builtin.stf import (
    RELEASED_BLOCKS,
    WEIGHT_NAMES,
    SpatialTokenFusion,
    STFConfig,
    concat_blocks,
    group_windows,
    squint_register_compressors,
)
from compressor_plugins.protocol import ImageFeatures, LoadError, LoadsWeights, OutputSpace
from compressor_plugins.registry import CompressorRegistry
from squint.app.tiny_pack import stf_blocks, write_tiny_pack
from squint.errors import InvalidRequest, Unsupported

# tests/conftest.py resolves the golden data folder (../shared/oracles or the vendored copy).
ORACLES = Path(os.environ["SQUINT_ORACLES"]) / "stf_mbtf"
CASES = sorted(ORACLES.glob("*.npz"))
CPU = torch.device("cpu")
REFERENCE = {"reference_mode": True}
PAPER = {"reference_mode": False}


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], prefix: str = "", blocks=None) -> Path:
    """Save plain-named tensors as safetensors under ``prefix + name`` (+ an optional config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({prefix + name: t.contiguous() for name, t in tensors.items()}, str(folder / "model.safetensors"))
    if blocks is not None:
        (folder / "config.json").write_text(json.dumps({"blocks": list(blocks)}))
    return folder


def random_weights(c: int, h: int, k: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    config = STFConfig(vision_width=c, llm_width=h, blocks=tuple(range(k)))
    return {name: torch.randn(shape, generator=g) / shape[-1] ** 0.5 for name, shape in config.shapes().items()}


def random_features(side: int, c: int, layers: int = 24, seed: int = 0, rows: int | None = None) -> ImageFeatures:
    rows = side if rows is None else rows
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(layers + 1, 1 + rows * side, c, generator=g)  # [layers + 1, 1 + n, C]
    return ImageFeatures(patch_features=hidden[-2, 1:], grid=(rows, side), hidden_states=tuple(hidden))


def loaded(folder: Path, dtype: torch.dtype = torch.float32) -> SpatialTokenFusion:
    stf = SpatialTokenFusion()
    stf.load_weights(folder, CPU, dtype)
    return stf


@pytest.fixture(scope="module")
def random_stf(tmp_path_factory) -> SpatialTokenFusion:
    return loaded(write_weights(tmp_path_factory.mktemp("stf-random"), random_weights(c=8, h=12)))


# --- golden data: the released code, matched in reference_mode ---------------------------------


def oracle(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


@pytest.mark.parametrize("prefix", ["", "base_model.model."], ids=["released-names", "peft-prefixed"])
@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_reference_mode_matches_the_released_code(case, prefix, tmp_path):
    data = oracle(case)
    # The oracle stores the weights under their released names ("model.mm_projector...").
    weights = {name: torch.from_numpy(data[name]) for name in data if name.startswith("model.")}
    assert sorted(weights) == sorted(f"model.{name}" for name in WEIGHT_NAMES)
    stf = loaded(write_weights(tmp_path, weights, prefix))
    hidden = torch.from_numpy(data["in_hidden_states"])  # [25, B, 1 + n, C]
    n = hidden.shape[2] - 1
    side = int(round(n**0.5))
    assert side * side == n
    for row in range(hidden.shape[1]):  # the compressor is per image: each batch row on its own
        states = tuple(hidden[:, row])  # 25 x [1 + n, C]
        features = ImageFeatures(patch_features=states[-2][1:], grid=(side, side), hidden_states=states)
        concat = concat_blocks(states, RELEASED_BLOCKS)  # [n, 8C]
        torch.testing.assert_close(concat, torch.from_numpy(data["mbtf_concat"][row]), rtol=0, atol=0)
        fused = stf.model.mm_projector_crosslayer(concat)  # [n, C]
        torch.testing.assert_close(fused, torch.from_numpy(data["mbtf_out"][row]))
        grouped = group_windows(fused, side)  # [n / 4, 4C]
        torch.testing.assert_close(grouped, torch.from_numpy(data["stf_grouped"][row]))
        out = stf.compress(features, REFERENCE)
        assert out.tokens.shape[0] == stf.predict_tokens((side, side), REFERENCE) == n // 4
        torch.testing.assert_close(out.tokens, torch.from_numpy(data["out_tokens"][row]))
        torch.testing.assert_close(out.tokens, torch.from_numpy(data["out_tokens_5d_path"][row]))
        # Even grids: the paper's mode is the same operator.
        torch.testing.assert_close(stf.compress(features, PAPER).tokens, out.tokens, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_token_major_grouping_does_not_match_the_released_weights(case):
    """Pitfall 14: concatenating the four tokens of a window is a different operator."""
    data = oracle(case)
    fused = torch.from_numpy(data["mbtf_out"][0])  # [n, C]
    side = int(round(fused.shape[0] ** 0.5))
    half, c = side // 2, fused.shape[1]
    token_major = fused.reshape(half, 2, half, 2, c).permute(0, 2, 1, 3, 4).reshape(half * half, 4 * c)
    assert not torch.allclose(token_major, torch.from_numpy(data["stf_grouped"][0]))
    assert torch.equal(group_windows(fused, side), torch.from_numpy(data["stf_grouped"][0]))


# --- the operator on unseen inputs ------------------------------------------------------------------


def test_grouping_is_channel_major_in_raster_window_order():
    side, c = 6, 5
    tokens = torch.randn(side * side, c)
    grouped = group_windows(tokens, side)  # [9, 20]
    for wr in range(3):
        for wc in range(3):
            for ch in range(c):
                for dy in range(2):
                    for dx in range(2):
                        patch = (2 * wr + dy) * side + 2 * wc + dx
                        assert grouped[wr * 3 + wc, ch * 4 + dy * 2 + dx] == tokens[patch, ch]


def test_grouping_and_first_projector_linear_are_a_2x2_stride_2_conv(random_stf):
    """docs/methods.md §3.4: space-to-depth + Linear(4C -> 16C) == Conv2d(C, 16C, 2, stride 2)."""
    side, model = 10, random_stf.model
    c = model.config.vision_width
    fused = torch.randn(side * side, c)  # [n, C]
    linear = model.mm_projector[0]
    via_linear = linear(group_windows(fused, side))  # [25, 16C]
    conv_weight = linear.weight.view(linear.out_features, c, 2, 2)  # [16C, C, 2, 2]
    grid = fused.T.reshape(1, c, side, side)  # [1, C, side, side]
    via_conv = F.conv2d(grid, conv_weight, linear.bias, stride=2).flatten(2)[0].T  # [25, 16C], raster
    torch.testing.assert_close(via_linear, via_conv)


def test_output_is_mbtf_then_windows_then_projector_with_exact_gelu(random_stf):
    features = random_features(side=6, c=8)
    out = random_stf.compress(features, PAPER)
    w = {name: t for name, t in random_stf.model.state_dict().items()}
    concat = torch.cat([features.hidden_states[b][1:] for b in (23, 21, 18, 15, 12, 9, 6, 3)], dim=-1)
    fused = F.gelu(concat @ w["mm_projector_crosslayer.0.weight"].T + w["mm_projector_crosslayer.0.bias"])
    fused = fused @ w["mm_projector_crosslayer.2.weight"].T + w["mm_projector_crosslayer.2.bias"]  # no GELU
    grouped = group_windows(fused, 6)
    hidden = F.gelu(grouped @ w["mm_projector.0.weight"].T + w["mm_projector.0.bias"])
    expected = hidden @ w["mm_projector.2.weight"].T + w["mm_projector.2.bias"]
    torch.testing.assert_close(out.tokens, expected)
    tanh = F.gelu(grouped @ w["mm_projector.0.weight"].T + w["mm_projector.0.bias"], approximate="tanh")
    assert not torch.allclose(
        out.tokens, tanh @ w["mm_projector.2.weight"].T + w["mm_projector.2.bias"], rtol=0, atol=1e-6
    )


def test_block_order_matters(random_stf):
    """Pitfall 13: deepest first, block 23 (hidden_states[-2]) rather than 24."""
    features = random_features(side=4, c=8)
    out = random_stf.compress(features, PAPER)
    assert out.notes["blocks"] == [23, 21, 18, 15, 12, 9, 6, 3]
    states = list(features.hidden_states)
    states[24] = torch.randn_like(states[24])  # block 24 is never read
    same = random_stf.compress(
        ImageFeatures(features.patch_features, features.grid, hidden_states=tuple(states)), PAPER
    )
    assert torch.equal(same.tokens, out.tokens)
    states[3] = torch.randn_like(states[3])
    changed = random_stf.compress(
        ImageFeatures(features.patch_features, features.grid, hidden_states=tuple(states)), PAPER
    )
    assert not torch.allclose(changed.tokens, out.tokens)


def test_covers_are_the_2x2_windows_in_raster_order(random_stf):
    out = random_stf.compress(random_features(side=4, c=8), PAPER)
    assert out.covers == ((0, 1, 4, 5), (2, 3, 6, 7), (8, 9, 12, 13), (10, 11, 14, 15))
    assert out.notes["dropped_edge_patches"] == 0


def test_weights_load_in_the_workers_dtype(random_stf, tmp_path):
    features = random_features(side=4, c=8)
    wide = loaded(write_weights(tmp_path, random_weights(c=8, h=12)), dtype=torch.float64)
    out = wide.compress(features, PAPER)  # float32 hidden states are cast to the weights' dtype
    assert out.tokens.dtype == torch.float64
    torch.testing.assert_close(out.tokens.float(), random_stf.compress(features, PAPER).tokens)


# --- grids: the paper's mode refuses, reference_mode drops ----------------------------------------


def test_odd_grid_refused_by_default_and_cropped_in_reference_mode(random_stf):
    features = random_features(side=5, c=8)
    with pytest.raises(
        InvalidRequest, match=r"needs an even grid side; this image gives 5x5 \(reference_mode: true drops"
    ):
        random_stf.compress(features, PAPER)
    with pytest.raises(InvalidRequest, match="even grid side"):
        random_stf.predict_tokens((5, 5), PAPER)
    out = random_stf.compress(features, REFERENCE)
    assert out.tokens.shape == (4, 12) and random_stf.predict_tokens((5, 5), REFERENCE) == 4
    # Same as the 4x4 grid without the last row and column; coverage keeps the 5-wide indices.
    keep = torch.tensor([0] + [1 + r * 5 + c for r in range(4) for c in range(4)])  # CLS + the 4x4 corner
    cropped = tuple(h[keep] for h in features.hidden_states)
    expected = random_stf.compress(ImageFeatures(cropped[-2][1:], (4, 4), hidden_states=cropped), PAPER)
    torch.testing.assert_close(out.tokens, expected.tokens)
    assert out.covers == ((0, 1, 5, 6), (2, 3, 7, 8), (10, 11, 15, 16), (12, 13, 17, 18))
    assert out.notes["dropped_edge_patches"] == 1


@pytest.mark.parametrize("params", [PAPER, REFERENCE], ids=["paper", "reference"])
def test_non_square_and_too_small_grids_are_refused_in_both_modes(random_stf, params):
    with pytest.raises(InvalidRequest, match="needs a square patch grid; this image gives 4x6"):
        random_stf.compress(random_features(side=6, c=8, rows=4), params)
    with pytest.raises(InvalidRequest, match="needs a grid of at least 2x2; got 1x1"):
        random_stf.predict_tokens((1, 1), params)


# --- weights: names, errors, the worker's contract -------------------------------------------------


def test_declares_llm_space_hidden_states_and_weights():
    assert SpatialTokenFusion.output_space is OutputSpace.LLM
    assert {need.value for need in SpatialTokenFusion.needs} == {"hidden_states"}
    assert isinstance(SpatialTokenFusion(), LoadsWeights)
    registry = CompressorRegistry()
    squint_register_compressors(registry)
    assert registry.get("stf").cls is SpatialTokenFusion


def test_compress_without_weights_says_the_pack_must_provide_them():
    with pytest.raises(Unsupported, match=r"compressor 'stf' has no weights.*serves stf only when the pack provides"):
        SpatialTokenFusion().compress(random_features(side=4, c=8), PAPER)


@pytest.mark.parametrize("prefix", ["", "model.", "base_model.", "base_model.model.", "base_model.model.model."])
def test_accepted_name_prefixes(tmp_path, prefix):
    stf = loaded(write_weights(tmp_path, random_weights(c=8, h=12), prefix))
    assert (stf.model.config.vision_width, stf.model.config.llm_width) == (8, 12)


def test_other_tensors_in_the_folder_are_ignored(tmp_path):
    weights = {f"model.{k}": v for k, v in random_weights(c=8, h=12).items()}
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)  # a full checkpoint's LLM
    stf = loaded(write_weights(tmp_path, weights))
    assert stf.model.config.blocks == RELEASED_BLOCKS


def test_missing_and_unexpected_keys_are_named_with_the_folder(tmp_path):
    weights = random_weights(c=8, h=12)
    del weights["mm_projector.2.bias"]
    weights["mm_projector.4.weight"] = torch.zeros(2, 2)
    folder = write_weights(tmp_path, weights, "model.")
    expected = (
        rf"stf weights in {tmp_path} do not fit: "
        r"missing \['mm_projector.2.bias'\], unexpected \['mm_projector.4.weight'\]"
    )
    with pytest.raises(LoadError, match=expected):
        loaded(folder)


def test_shape_mismatch_names_both_shapes(tmp_path):
    weights = random_weights(c=8, h=12)
    weights["mm_projector.0.weight"] = torch.zeros(128, 16)  # 16 != 4C = 32
    with pytest.raises(LoadError, match=r"mm_projector.0.weight is \[128, 16\], expected \[128, 32\]"):
        loaded(write_weights(tmp_path, weights))


def test_no_safetensors_and_duplicate_names_are_refused(tmp_path):
    with pytest.raises(LoadError, match=r"has no .safetensors files"):
        loaded(tmp_path)
    weights = random_weights(c=8, h=12)
    save_file({"model.mm_projector.0.bias": weights["mm_projector.0.bias"]}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(LoadError, match=r"are both 'mm_projector.0.bias'; keep one"):
        loaded(write_weights(tmp_path, weights))


def test_block_list_comes_from_config_and_must_fit_the_weights_and_the_clip(tmp_path):
    weights = random_weights(c=8, h=12, k=4)
    with pytest.raises(
        LoadError, match=r"fuses 4 hidden states of width 8, but the block list \[23, 21, .*, 3\] names 8"
    ):
        loaded(write_weights(tmp_path / "none", weights))
    stf = loaded(write_weights(tmp_path / "shallow", weights, blocks=[-2, 7, 4, 1]))
    out = stf.compress(random_features(side=4, c=8, layers=10), PAPER)
    assert out.tokens.shape == (4, 12) and out.notes["blocks"] == [-2, 7, 4, 1]
    with pytest.raises(Unsupported, match=r"this CLIP gives only 5 hidden states \(4 blocks\): \[7\] out of range"):
        stf.compress(random_features(side=4, c=8, layers=4), PAPER)
    (tmp_path / "shallow" / "config.json").write_text(json.dumps({"blocks": "23,21"}))
    with pytest.raises(LoadError, match="'blocks' must be a non-empty list"):
        loaded(tmp_path / "shallow")


def test_released_blocks_need_a_24_block_clip_and_the_clip_width(random_stf):
    with pytest.raises(Unsupported, match=r"is for a 24-block CLIP, this CLIP has 12 blocks; write the blocks"):
        random_stf.compress(random_features(side=4, c=8, layers=12), PAPER)
    with pytest.raises(
        Unsupported, match=r"expect hidden states of shape \[17, 8\].*hidden_states\[23\] is \[17, 16\]"
    ):
        random_stf.compress(random_features(side=4, c=16), PAPER)


# --- tiny packs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("stf-packs")
    return write_tiny_pack(root / "a", seed=0), write_tiny_pack(root / "b", seed=0)


def clip_hidden_states(clip_dir: Path, seed: int) -> tuple[tuple[torch.Tensor, ...], int]:
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    size = clip.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        hidden = clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    return tuple(h[0] for h in hidden), size // clip.config.vision_config.patch_size


def test_tiny_pack_is_still_deterministic_stf_included(tiny_pair):
    first, second = tiny_pair
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert Path("stf/model.safetensors") in files and Path("stf/config.json") in files
    assert files == sorted(p.relative_to(second.root) for p in second.root.rglob("*") if p.is_file())
    for name in files:
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes(), name


def test_tiny_pack_stf_runs_on_its_clip(tiny_pair):
    pack = tiny_pair[0]
    assert pack.compressor_dirs == {"stf": pack.root / "stf"}
    stf = loaded(pack.compressor_dirs["stf"])
    assert stf.model.config == STFConfig(32, 64, RELEASED_BLOCKS, 128, 512)
    outputs = []
    for seed in (0, 1):
        hidden, side = clip_hidden_states(pack.clip_dir, seed)
        assert len(hidden) == 25 and side == 24
        features = ImageFeatures(patch_features=hidden[-2][1:], grid=(side, side), hidden_states=hidden)
        outputs.append(stf.compress(features, PAPER).tokens)
    assert outputs[0].shape == (144, 64) and torch.isfinite(outputs[0]).all()
    # Not degenerate: tokens differ across positions and images, at a useful scale.
    assert 0.3 < outputs[0].std().item() < 100
    assert outputs[0].std(dim=0).mean() > 0.1 and (outputs[0] - outputs[1]).abs().mean() > 0.1


def test_alt_tiny_pack_carries_its_own_block_list(alt_pack):
    assert stf_blocks(12) == (11, 10, 9, 7, 6, 4, 3, 1) and stf_blocks(24) == RELEASED_BLOCKS
    config = json.loads((alt_pack.compressor_dirs["stf"] / "config.json").read_text())
    assert config == {"blocks": [11, 10, 9, 7, 6, 4, 3, 1]}
    stf = loaded(alt_pack.compressor_dirs["stf"])
    hidden, side = clip_hidden_states(alt_pack.clip_dir, 0)
    assert len(hidden) == 13 and side == 16
    out = stf.compress(ImageFeatures(hidden[-2][1:], (side, side), hidden_states=hidden), PAPER)
    assert out.tokens.shape == (64, 96) and torch.isfinite(out.tokens).all()


def test_the_vision_worker_serves_stf_from_the_pack(tiny_pair, png):
    from vision_worker.cache import InProcessCache
    from vision_worker.encoder import EncodeItem, VisionEncoder
    from vision_worker.images import ImageLimits
    from vision_worker.models import VisionModels

    registry = CompressorRegistry()
    squint_register_compressors(registry)
    models = VisionModels(tiny_pair[0])  # the worker loads stf's weights from the pack's manifest
    encoder = VisionEncoder(models, registry, InProcessCache(1 << 24), ImageLimits(), default_compressor="stf")
    [item] = asyncio.run(encoder.encode([EncodeItem(png(3))]))
    assert item.tokens.shape == (144, 64) and item.tokens_before == 576 and item.compressor == "stf"
