"""What a plugin author runs in their own CI: Squint's conformance kit, plus the method's own tests."""

import torch
from squint_tome.plugin import BipartiteMerge

from compressor_plugins.protocol import resolve_params
from compressor_plugins.testing import CompressorConformance, synthetic_features


class TestTomeConforms(CompressorConformance):
    compressor_class = BipartiteMerge
    param_cases = ({}, {"ratio": 0.25}, {"ratio": 0.0})


def test_identical_neighbours_merge_first():
    features = synthetic_features(grid=(4, 4))
    tokens = features.patch_features.clone()
    tokens[1] = tokens[0]  # patch 0 (set A) duplicates patch 1 (set B)
    features = type(features)(patch_features=tokens, grid=(4, 4))
    tome = BipartiteMerge()
    out = tome.compress(features, resolve_params(tome, {"ratio": 1 / 16}))
    assert out.tokens.shape[0] == 15 and out.covers[0] == (0, 1)
    torch.testing.assert_close(out.tokens[0], tokens[0])


def test_every_patch_is_covered_exactly_once():
    tome = BipartiteMerge()
    out = tome.compress(synthetic_features(), resolve_params(tome, {}))
    covered = sorted(p for c in out.covers for p in c)
    assert covered == list(range(576)) and out.tokens.shape[0] == 288
