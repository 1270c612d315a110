"""How small an image can get under a setting, known before any image arrives."""

import pytest

from compressor_plugins.registry import PluginSettings, load_compressors
from squint.errors import CompressorNotFound, InvalidRequest
from vision_worker.cache import InProcessCache
from vision_worker.encoder import VisionEncoder
from vision_worker.images import ImageLimits
from vision_worker.models import VisionModels


@pytest.fixture(scope="module")
def encoder(tiny_pack):
    return VisionEncoder(
        VisionModels(tiny_pack), load_compressors(PluginSettings()), InProcessCache(1 << 20), ImageLimits()
    )


@pytest.mark.parametrize(
    ("compressor", "params", "smallest"),
    [
        ("none", {}, 576),  # cannot fit a budget: every patch, 24 x 24
        ("dfmr", {"force_factor": 2}, 144),  # a forced factor is what it is
        ("dfmr", {}, 1),  # any factor up to the whole grid
        ("avgpool", {}, 1),
        ("text_recovery", {}, 1),  # drops tokens one by one
        ("tome", {}, 288),  # the example plugin: predicts its count, cannot fit a budget
    ],
)
def test_the_smallest_count_follows_from_the_grid_and_the_declared_counts(encoder, compressor, params, smallest):
    assert encoder.smallest(compressor, params) == smallest


def test_a_bad_setting_is_refused_as_analyze_would(encoder):
    with pytest.raises(CompressorNotFound):
        encoder.smallest("nope", {})
    with pytest.raises(InvalidRequest, match="stride"):
        encoder.smallest("avgpool", {"stride": 0})
