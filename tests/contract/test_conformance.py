"""The conformance kit over every registered compressor, on real tiny-pack CLIP features."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from compressor_plugins.protocol import LoadsWeights
from compressor_plugins.registry import PluginSettings, load_compressors
from compressor_plugins.testing import CompressorConformance, Dimensions, check_compressor, check_output
from vision_worker.models import FeatureRequest, VisionModels

# Parameter settings worth checking per built-in; a compressor not listed runs with its defaults.
PARAM_CASES = {
    "avgpool": ({}, {"stride": 3}, {"stride": 5}),
    "dfmr": ({}, {"force_factor": 2}, {"tau": 0.0}, {"feature_norm": "none", "tau": 10.0}),
    "staged_pool": ({}, {"stride": 2, "shape": "2d"}, {"layer": 2, "stride": 8}, {"stride": 7}),
    "stf": ({}, {"reference_mode": True}),
    "text_recovery": ({}, {"reference_mode": True}),
}
REGISTRY = load_compressors(PluginSettings())


@pytest.fixture(scope="module")
def models(tiny_pack):
    return VisionModels(tiny_pack)


@pytest.fixture(scope="module")
def real_features(models, png):
    everything = FeatureRequest(True, True, True, True, True, "What is in the image?")
    return [models.features(Image.open(io.BytesIO(png(seed))).convert("RGB"), everything) for seed in (0, 1)]


@pytest.fixture(scope="module")
def png():
    import numpy as np

    def make(seed):
        buffer = io.BytesIO()
        Image.fromarray(np.random.RandomState(seed).randint(0, 255, (200, 300, 3), dtype=np.uint8)).save(buffer, "PNG")
        return buffer.getvalue()

    return make


@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_registered_compressor_conforms(name, tiny_pack, models, real_features):
    compressor = REGISTRY.get(name).cls()
    if isinstance(compressor, LoadsWeights) and name in tiny_pack.compressor_dirs:
        compressor.load_weights(tiny_pack.compressor_dirs[name], torch.device("cpu"), torch.float32)
    dims = Dimensions(vision=models.vision_width, llm=models.llm_width, projection=16, layers=24)
    check_compressor(
        compressor,
        PARAM_CASES.get(name, ({},)),
        dims,
        features=real_features[0],
        other_features=real_features[1],
    )


def test_the_kit_catches_a_compressor_that_lies_about_its_count(real_features):
    from compressor_plugins.builtin.avgpool import AvgPool2d
    from compressor_plugins.testing import ConformanceError

    class Liar(AvgPool2d):
        def predict_tokens(self, grid, params):
            return 1

    with pytest.raises(ConformanceError, match="predicted 1 tokens for grid \\(24, 24\\) but returned 144"):
        check_compressor(Liar(), ({},), Dimensions(), features=real_features[0])


def test_the_kit_catches_state_carried_between_images():
    from compressor_plugins.builtin.none import NoCompression
    from compressor_plugins.testing import ConformanceError

    class Stateful(NoCompression):
        calls = 0

        def compress(self, features, params):
            Stateful.calls += 1
            out = super().compress(features, params)
            return type(out)(tokens=out.tokens + Stateful.calls, covers=out.covers)

    with pytest.raises(ConformanceError, match="gave different outputs"):
        check_compressor(Stateful(), ({},), Dimensions())


class TestKitAsAPytestSuite(CompressorConformance):
    """What a plugin author writes: the built-in avgpool through the subclassable suite."""

    from compressor_plugins.builtin.avgpool import AvgPool2d as compressor_class

    param_cases = ({}, {"stride": 4})


def test_check_output_flags_wrong_width(real_features):
    from compressor_plugins.builtin.none import NoCompression
    from compressor_plugins.protocol import CompressedImage
    from compressor_plugins.testing import ConformanceError

    bad = CompressedImage(tokens=torch.zeros(3, 7), covers=((0,), (1,), (2,)))
    with pytest.raises(ConformanceError, match=r"expected \[m, 32\]"):
        check_output(NoCompression(), {}, real_features[0], bad, Dimensions())
