import os
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor_plugins.builtin.staged_pool import StagedPooling
from compressor_plugins.pooling import pool_image_spans, pool_tokens_1d, pool_tokens_2d, pooled_positions
from compressor_plugins.protocol import ImageFeatures, LLMDirective, resolve_params
from squint.errors import InvalidRequest

# tests/conftest.py resolves the golden data folder (../shared/oracles or the vendored copy).
ORACLES = Path(os.environ["SQUINT_ORACLES"]) / "llavolta"
POOL_CASES = sorted(ORACLES.glob("pool_*.npz"))


@pytest.mark.parametrize("path", POOL_CASES, ids=lambda p: p.name)
def test_reference_mode_matches_the_released_pooling(path):
    case = np.load(path)
    hidden, positions = pool_image_spans(
        torch.from_numpy(case["in_hidden"]),
        torch.from_numpy(case["in_position_ids"]),
        case["in_images_idx"].tolist(),
        span_length=576,
        stride=int(case["stride"]),
        reference_mode=True,
    )
    # float32: window means of values up to ~4, so relative to the value, with a floor for means near 0.
    np.testing.assert_allclose(hidden.numpy(), case["out_hidden"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(positions.numpy(), case["out_position_ids"])


def test_positions_keep_gaps_and_float16_rounds_above_2048():
    positions = torch.arange(2045, 2045 + 16)
    assert pooled_positions(positions, 2, reference_mode=True)[:4].tolist() == [2046, 2048, 2048, 2052]
    assert pooled_positions(positions, 2, reference_mode=False)[:4].tolist() == [2045, 2047, 2049, 2051]
    # Below 2048 the two modes agree: b + floor(jS + (S - 1) / 2).
    low = torch.arange(5, 5 + 576)
    assert torch.equal(pooled_positions(low, 8, True), pooled_positions(low, 8, False))
    assert pooled_positions(low, 8, False)[:3].tolist() == [8, 16, 24]


def test_unseen_case_two_samples_two_images_each():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 4 + 2 * 576 + 3, 8, generator=g)
    out, pos = pool_image_spans(hidden, torch.arange(hidden.shape[1])[None], [[1, 577], [2, 578]], 576, 4)
    assert out.shape == (2, hidden.shape[1] - 2 * (576 - 144), 8)
    # Each pooled token is the mean of its window; text around the spans is untouched.
    torch.testing.assert_close(out[0, 1], hidden[0, 1:5].mean(0))
    torch.testing.assert_close(out[1, :2], hidden[1, :2])
    assert pos[0, :3].tolist() == [0, 2, 6]
    # Samples with different image counts would end at different lengths: refused.
    with pytest.raises(ValueError, match="different lengths"):
        pool_image_spans(hidden, torch.arange(hidden.shape[1])[None], [[1], [1, 577]], 576, 4)


def features(side=24, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(
        patch_features=torch.randn(side * side, 8, generator=g),
        grid=(side, side),
        llm_tokens=torch.randn(side * side, hidden, generator=g),
    )


@pytest.mark.parametrize("stride", [1, 2, 4, 8, 16, 7])
def test_before_the_llm_pools_projected_tokens_in_raster_windows(stride):
    f = features()
    params = resolve_params(StagedPooling, {"stride": stride})
    out = StagedPooling().compress(f, params)
    assert out.tokens.shape[0] == 576 // stride == StagedPooling().predict_tokens((24, 24), params)
    torch.testing.assert_close(out.tokens[1], f.llm_tokens[stride : 2 * stride].mean(0))
    assert out.covers[1] == tuple(range(stride, 2 * stride)) and out.directive is None


def test_1d_is_not_2d():
    f = features()
    one = StagedPooling().compress(f, resolve_params(StagedPooling, {"stride": 4}))
    two = StagedPooling().compress(f, resolve_params(StagedPooling, {"stride": 2, "shape": "2d"}))
    assert one.tokens.shape == two.tokens.shape == (144, 16)
    assert not torch.allclose(one.tokens, two.tokens)
    torch.testing.assert_close(two.tokens, pool_tokens_2d(f.llm_tokens, 24, 2))
    assert two.covers[0] == (0, 1, 24, 25)


def test_in_llm_layer_keeps_every_token_and_emits_a_directive():
    f = features()
    params = resolve_params(StagedPooling, {"layer": 2, "stride": 8, "reference_mode": True})
    out = StagedPooling().compress(f, params)
    assert torch.equal(out.tokens, f.llm_tokens)
    assert out.directive == LLMDirective(layer=2, stride=8, shape="1d", reference_mode=True)
    assert StagedPooling().predict_tokens((24, 24), params) == 576
    assert out.notes["pooled_in_llm_to"] == 72


def test_edge_cases():
    with pytest.raises(InvalidRequest, match="stride is 600; the maximum for this image's 24x24 grid \\(1d\\) is 576"):
        StagedPooling().predict_tokens((24, 24), resolve_params(StagedPooling, {"stride": 600}))
    with pytest.raises(InvalidRequest, match="square patch grid"):
        StagedPooling().predict_tokens((4, 6), resolve_params(StagedPooling, {"stride": 2, "shape": "2d"}))
    small = features(side=2)
    out = StagedPooling().compress(small, resolve_params(StagedPooling, {"stride": 3}))
    assert out.tokens.shape[0] == 1 and out.notes["dropped_tail"] == 1  # 4 tokens, one window of 3
    torch.testing.assert_close(pool_tokens_1d(small.llm_tokens, 4), small.llm_tokens.mean(0, keepdim=True))
