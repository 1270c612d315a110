import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from compressor_plugins.builtin.dfmr import DynamicFeatureMapReduction
from compressor_plugins.complexity import mean_window_std
from compressor_plugins.protocol import ImageFeatures, create_compressor, resolve_calibration_params, resolve_params
from squint.errors import InvalidRequest


def features_of(grid: torch.Tensor) -> ImageFeatures:
    """[d, side, side] map -> ImageFeatures with raster-ordered patches."""
    d, side, _ = grid.shape
    return ImageFeatures(patch_features=grid.reshape(d, -1).T.contiguous(), grid=(side, side))


def run(grid, **params):
    dfmr = DynamicFeatureMapReduction()
    return dfmr.compress(features_of(grid), resolve_params(dfmr, params))


def smooth_map(side=24, d=32, seed=0):
    """Constant inside every 3x3 window: sigma_bar(2) > 0 in general, sigma_bar(3) == 0."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, d, side // 3, side // 3, generator=g)
    return F.interpolate(coarse, scale_factor=3, mode="nearest")[0]


def test_constant_map_selects_the_largest_factor():
    out = run(torch.ones(32, 24, 24) * torch.randn(32, 1, 1))
    assert out.notes["factor"] == 3 and out.tokens.shape[0] == 64
    assert out.complexity == 0.0


def test_high_spread_map_keeps_all_576():
    out = run(torch.randn(32, 24, 24, generator=torch.Generator().manual_seed(1)) * 10)
    assert out.notes["factor"] == 1 and out.tokens.shape[0] == 576
    assert out.complexity > 0.05


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.0, 3.0), tau=st.floats(0.0, 2.0))
def test_counts_are_always_side_over_factor_squared_and_pooling_is_avg_pool2d(seed, scale, tau):
    grid = torch.randn(8, 24, 24, generator=torch.Generator().manual_seed(seed)) * scale
    out = run(grid, tau=tau)
    factor = out.notes["factor"]
    assert out.tokens.shape[0] == (24 // factor) ** 2
    expected = F.avg_pool2d(grid[None], factor).flatten(2)[0].T
    torch.testing.assert_close(out.tokens, expected)
    assert len(out.covers) == out.tokens.shape[0] and all(len(c) == factor * factor for c in out.covers)


def test_more_detail_never_means_more_compression():
    base = torch.randn(16, 24, 24, generator=torch.Generator().manual_seed(3))
    factors = [run(base * scale, feature_norm="none", tau=0.5).notes["factor"] for scale in (0.0, 0.1, 0.5, 1.0, 4.0)]
    assert factors == sorted(factors, reverse=True)


def test_window_std_is_population_std_per_channel():
    grid = torch.tensor([[[0.0, 2.0], [0.0, 2.0]]])  # one channel, one 2x2 window: values 0,2,0,2
    assert mean_window_std(grid, 2) == pytest.approx(1.0)
    assert mean_window_std(grid, 1) == 0.0


def test_smooth_windows_are_pooled_at_the_factor_they_are_smooth_at():
    out = run(smooth_map(), feature_norm="none", tau=1e-6)
    assert out.notes["sigma_bar"]["3"] < 1e-6 < out.notes["sigma_bar"]["2"]
    assert out.notes["factor"] == 1  # sigma_bar(2) > tau stops the climb before 3


def test_forced_factor_and_floor_on_indivisible_grids():
    out = run(torch.randn(8, 24, 24), force_factor=5)
    assert out.tokens.shape[0] == 16 and out.notes["dropped_edge_patches"] == 4
    dfmr = DynamicFeatureMapReduction()
    assert dfmr.predict_tokens((24, 24), resolve_params(dfmr, {"force_factor": 5})) == 16
    assert dfmr.predict_tokens((24, 24), resolve_params(dfmr, {})) is None


def test_budget_steps_the_factor_up():
    dfmr = DynamicFeatureMapReduction()
    busy = features_of(torch.randn(8, 24, 24) * 10)
    assert dfmr.compress(busy, resolve_params(dfmr, {})).tokens.shape[0] == 576
    within = dfmr.compress_within(busy, resolve_params(dfmr, {}), budget=100)
    assert within.tokens.shape[0] == 64 and within.notes["factor_chosen_by_image"] == 1
    tight = dfmr.compress_within(busy, resolve_params(dfmr, {}), budget=20)
    assert tight.tokens.shape[0] <= 20


def test_calibrated_thresholds_from_the_pack_are_used_unless_the_request_sets_tau(tmp_path):
    grid = torch.randn(8, 24, 24, generator=torch.Generator().manual_seed(4))
    (tmp_path / "calibration.json").write_text(json.dumps({"thresholds": {"2": 100.0, "3": 100.0}}))
    # How the vision worker makes it from the folder the pack names for dfmr.
    dfmr = create_compressor(DynamicFeatureMapReduction, tmp_path, torch.device("cpu"), torch.float32)
    assert dfmr.compress(features_of(grid), resolve_params(dfmr, {})).notes["factor"] == 3
    assert dfmr.compress(features_of(grid), resolve_params(dfmr, {"tau": 0.0})).notes["factor"] == 1


@pytest.mark.parametrize(
    ("params", "grid", "message"),
    [
        ({"factors": "3,2"}, (24, 24), "ascending"),
        ({"factors": "a"}, (24, 24), "comma-separated whole numbers"),
        ({}, (4, 6), "square patch grid"),
        ({"force_factor": 30}, (24, 24), "the maximum for this image's 24x24 grid is 24"),
    ],
)
def test_bad_settings_and_grids_are_refused(params, grid, message):
    dfmr = DynamicFeatureMapReduction()
    with pytest.raises(InvalidRequest, match=message):
        dfmr.predict_tokens(grid, resolve_params(dfmr, params))


def test_small_grids_use_only_the_factors_that_fit():
    out = run(torch.zeros(4, 2, 2))
    assert out.notes["factor"] == 2 and out.tokens.shape[0] == 1


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(3, 40), first=st.floats(0.0, 1.0))
def test_calibration_splits_images_in_the_asked_shares(data, n, first):
    from compressor_plugins.builtin.dfmr import calibrate, choose_factor

    # Distinct values per factor: with ties no threshold can split exactly.
    distinct = st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n, unique=True)
    profiles = [{1: 0.0, 2: a, 3: b} for a, b in zip(data.draw(distinct), data.draw(distinct))]
    shares = (first, (1 - first) / 2, (1 - first) / 2)
    thresholds = calibrate(profiles, (1, 2, 3), shares)
    chosen = [choose_factor(p, (1, 2, 3), thresholds) for p in profiles]
    n = len(profiles)
    assert chosen.count(1) == round(first * n)
    # Later steps split what remains; distinct values make the split exact up to rounding.
    assert abs(chosen.count(2) - round(shares[1] * n)) <= 1


def test_calibration_rejects_shares_that_do_not_sum_to_one():
    from compressor_plugins.builtin.dfmr import calibrate

    with pytest.raises(ValueError, match="summing to 1"):
        calibrate([{1: 0, 2: 0.1, 3: 0.2}], (1, 2, 3), (0.5, 0.5, 0.5))


def test_calibrate_gives_the_pack_file_and_the_lines_squint_calibrate_prints():
    dfmr = DynamicFeatureMapReduction()
    busy = [torch.randn(32, 24, 24, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    samples = [features_of(grid) for grid in busy + [smooth_map(seed=0), smooth_map(seed=1)]]
    result = dfmr.calibrate(iter(samples), resolve_calibration_params(dfmr, {"share": "0.5,0.25,0.25"}))
    assert list(result.data) == ["thresholds", "factors", "feature_norm", "shares", "images"]
    assert set(result.data["thresholds"]) == {"2", "3"} and result.data["images"] == 4
    assert result.data["shares"] == [0.5, 0.25, 0.25] and result.summary.startswith("thresholds {2: ")
    assert result.details[0].startswith("factor shares: 1: 2/4, 2: ")
    loaded = DynamicFeatureMapReduction()
    loaded.load_calibration(json.loads(json.dumps(result.data)))
    assert loaded.calibrated == {int(k): v for k, v in result.data["thresholds"].items()}
    assert resolve_calibration_params(dfmr, {})["share"] == ""  # equal shares
    assert dfmr.calibrate(iter(samples), resolve_calibration_params(dfmr, {})).data["shares"] == [1 / 3] * 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"share": "a,b,c"}, "share 'a,b,c' must be comma-separated numbers"),
        ({"share": "0.5,0.5,0.5"}, "summing to 1"),
        ({"factors": "3,2"}, "ascending"),
        ({"feature_norm": "pca"}, "calibration option feature_norm .* must be one of none, layernorm, l2"),
    ],
)
def test_calibration_options_it_cannot_use_are_refused_with_invalid_request(options, message):
    dfmr = DynamicFeatureMapReduction()
    with pytest.raises(InvalidRequest, match=message):
        dfmr.calibrate(iter([features_of(smooth_map())]), resolve_calibration_params(dfmr, options))


def test_a_calibration_without_thresholds_is_a_load_error():
    from compressor_plugins.protocol import LoadError

    with pytest.raises(LoadError, match="'thresholds' must map factors to numbers"):
        DynamicFeatureMapReduction().load_calibration({"factors": [1, 2, 3]})
