import pytest
import torch
import torch.nn.functional as F

from compressor_plugins.builtin.avgpool import AvgPool2d
from compressor_plugins.builtin.none import NoCompression
from compressor_plugins.protocol import ImageFeatures
from squint.errors import InvalidRequest


def features(side: int, d: int = 8, seed: int = 0) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(patch_features=torch.randn(side * side, d, generator=g), grid=(side, side))


@pytest.mark.parametrize(("side", "stride"), [(24, 2), (24, 3), (24, 5), (16, 4), (5, 2)])
def test_equals_avg_pool2d_in_raster_order(side, stride):
    f = features(side)
    out = AvgPool2d().compress(f, {"stride": stride})
    grid = f.patch_features.T.reshape(1, -1, side, side)
    expected = F.avg_pool2d(grid, stride).flatten(2)[0].T
    assert out.tokens.shape[0] == (side // stride) ** 2 == AvgPool2d().predict_tokens((side, side), {"stride": stride})
    torch.testing.assert_close(out.tokens, expected)


def test_covers_name_the_patches_of_each_window():
    out = AvgPool2d().compress(features(4), {"stride": 2})
    assert out.covers == ((0, 1, 4, 5), (2, 3, 6, 7), (8, 9, 12, 13), (10, 11, 14, 15))
    # Every covered patch's mean is the token.
    f = features(4)
    torch.testing.assert_close(out.tokens[3], f.patch_features[list(out.covers[3])].mean(0))


def test_non_square_and_too_large_stride_are_refused():
    with pytest.raises(InvalidRequest, match="needs a square patch grid; this image gives 4x6"):
        AvgPool2d().compress(ImageFeatures(torch.zeros(24, 8), (4, 6)), {"stride": 2})
    with pytest.raises(InvalidRequest, match="stride is 5; the maximum for this image's 4x4 grid is 4"):
        AvgPool2d().predict_tokens((4, 4), {"stride": 5})


def test_none_keeps_every_patch():
    f = features(3)
    out = NoCompression().compress(f, {})
    assert torch.equal(out.tokens, f.patch_features) and out.covers == tuple((i,) for i in range(9))
