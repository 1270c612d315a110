"""Training with --dfmr pools with the dfmr compressor itself: the same code as serving."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from compressor_plugins.builtin.dfmr import DynamicFeatureMapReduction
from compressor_plugins.protocol import ImageFeatures, resolve_params
from training.compression import DFMRTraining


def _features(side: int = 24, width: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(side * side, width, generator=generator)


def test_random_draws_every_factor_and_pools_as_avg_pool2d(tiny_pack):
    training = DFMRTraining("random", tiny_pack, (24, 24), seed=1)
    features = _features()
    counts = Counter()
    for _ in range(60):
        rows = training(features)
        counts[rows.shape[0]] += 1
        side = int(rows.shape[0] ** 0.5)
        factor = 24 // side
        grid = features.T.reshape(1, -1, 24, 24)
        expected = F.avg_pool2d(grid, factor).reshape(features.shape[1], -1).T
        torch.testing.assert_close(rows, expected)
    assert set(counts) == {576, 144, 64} and min(counts.values()) >= 10


def test_dynamic_is_the_compressor_choosing_by_sigma_bar(tiny_pack):
    training = DFMRTraining("dynamic", tiny_pack, (24, 24))
    features = _features()
    compressor = DynamicFeatureMapReduction()
    expected = compressor.compress(ImageFeatures(features, (24, 24)), resolve_params(compressor, {})).tokens
    torch.testing.assert_close(training(features), expected)
    flat = torch.ones(576, 8)  # no variability: the largest factor
    assert training(flat).shape[0] == 64


def test_training_calls_the_serving_compressor(tiny_pack, monkeypatch):
    calls = []
    original = DynamicFeatureMapReduction.compress

    def spy(self, features, params):
        calls.append(params["force_factor"])
        return original(self, features, params)

    monkeypatch.setattr(DynamicFeatureMapReduction, "compress", spy)
    DFMRTraining("random", tiny_pack, (24, 24))(_features())
    assert len(calls) == 1 and calls[0] in (1, 2, 3)


def test_unknown_mode_is_refused(tiny_pack):
    with pytest.raises(ValueError, match="--dfmr 'sometimes' is not one of random, dynamic"):
        DFMRTraining("sometimes", tiny_pack, (24, 24))
