import io

import pytest
from PIL import Image
from squint_test_media import png_claiming

from squint.errors import InvalidMedia
from vision_worker.images import ImageLimits, decode_image


def test_decodes_to_rgb(png):
    image = Image.open(io.BytesIO(png(0))).convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    decoded = decode_image(buffer.getvalue(), ImageLimits())
    assert decoded.mode == "RGB" and decoded.size == (300, 200)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"chunks\[1\].image.data is empty"),
        (b"definitely not an image", r"chunks\[1\].image.data is not a decodable image"),
    ],
)
def test_bad_bytes_name_the_field(data, message):
    with pytest.raises(InvalidMedia, match=message):
        decode_image(data, ImageLimits(), "chunks[1].image")


def test_formats_outside_the_allow_list_are_refused():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(InvalidMedia, match="is not a decodable image"):
        decode_image(eps, ImageLimits())


def test_truncated_image_is_refused(png):
    data = png(0)
    with pytest.raises(InvalidMedia, match="could not be decoded"):
        decode_image(data[: len(data) // 2], ImageLimits())


def test_byte_limit_names_the_limit(png):
    with pytest.raises(InvalidMedia, match=r"the limit is 0.0 MiB \(max_image_bytes=1000\)"):
        decode_image(png(0), ImageLimits(max_image_bytes=1000))


@pytest.mark.parametrize("side", [7000, 100_000])  # 49 megapixels; 10 gigapixels (PIL's own guard)
def test_pixel_limit_is_checked_before_decoding(side):
    bomb = png_claiming(side, side)  # a header claiming side x side, a few bytes of data
    with pytest.raises(InvalidMedia, match=r"the limit (is|of) 40000000 pixels"):
        decode_image(bomb, ImageLimits())
