"""Every image and frame has a complexity for the budget policy, whatever its compressor."""

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from compressor_plugins.complexity import image_complexity, mean_window_std
from compressor_plugins.registry import PluginSettings, load_compressors
from vision_worker.cache import InProcessCache
from vision_worker.encoder import EncodeItem, VisionEncoder
from vision_worker.images import ImageLimits
from vision_worker.models import VisionModels


@pytest.fixture(scope="module")
def encoder(tiny_pack):
    return VisionEncoder(
        VisionModels(tiny_pack), load_compressors(PluginSettings()), InProcessCache(1 << 26), ImageLimits()
    )


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def plain_picture() -> bytes:
    return encode_png(Image.new("RGB", (336, 336), (40, 40, 40)))


def busy_picture() -> bytes:
    return encode_png(Image.fromarray(np.random.RandomState(5).randint(0, 255, (336, 336, 3), dtype=np.uint8)))


def test_sigma_bar_by_hand():
    # One channel, a 2 x 4 map: windows [[0, 1], [0, 1]] and [[2, 2], [2, 2]] -> std 0.5 and 0.
    grid = torch.tensor([[[0.0, 1.0, 2.0, 2.0], [0.0, 1.0, 2.0, 2.0]]])
    assert mean_window_std(grid, 2) == pytest.approx(0.25)
    assert mean_window_std(grid, 1) == 0.0
    flat = torch.ones(16, 8)
    assert image_complexity(flat, (4, 4), feature_norm="none") == 0.0


@pytest.mark.parametrize("compressor", ["avgpool", "text_recovery", "none"])
def test_a_compressor_without_its_own_complexity_gets_sigma_bar_of_its_features(encoder, compressor):
    async def analyse(picture):
        [analysis] = await encoder.analyze([EncodeItem(picture, compressor, question="What is it?")])
        [encoded] = await encoder.encode([EncodeItem(picture, compressor, question="What is it?")])
        return analysis, encoded

    plain, plain_encoded = asyncio.run(analyse(plain_picture()))
    busy, busy_encoded = asyncio.run(analyse(busy_picture()))
    assert plain.complexity is not None and busy.complexity is not None
    assert busy.complexity > plain.complexity >= 0.0
    # Encode reports the same number (the usage's complexity).
    assert (plain_encoded.complexity, busy_encoded.complexity) == (plain.complexity, busy.complexity)


def test_the_reported_complexity_is_dfmrs_sigma_bar_at_its_second_factor(encoder):
    """The same measure DFMR chooses its factor by (factors 1,2,3: sigma_bar(2))."""
    picture = busy_picture()
    [with_dfmr] = asyncio.run(encoder.analyze([EncodeItem(picture, "dfmr")]))
    [with_avgpool] = asyncio.run(encoder.analyze([EncodeItem(picture, "avgpool")]))
    assert with_avgpool.complexity == pytest.approx(with_dfmr.complexity, rel=1e-5)
