"""Image decoding with limits: bad bytes and decompression bombs are refused before decoding."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from squint.errors import InvalidMedia


@dataclass(frozen=True)
class ImageLimits:
    """What the vision worker accepts per image."""

    max_image_bytes: int = field(default=20 * 1024 * 1024, metadata={"help": "largest encoded image file"})
    max_image_pixels: int = field(
        default=40_000_000, metadata={"help": "largest width x height, checked from the header before decoding"}
    )
    max_images_per_request: int = field(default=64, metadata={"help": "most images in one Analyze or Encode call"})


def content_hash(data: bytes) -> str:
    """The identity of an image for caching and routing: sha256 of its file bytes."""
    return hashlib.sha256(data).hexdigest()


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


# What PIL may parse. Formats outside this list (EPS runs Ghostscript, for one) are refused.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(data: bytes, limits: ImageLimits, label: str = "image") -> Image.Image:
    """Read the header and check the limits without decoding pixels (cheap; safe on the event loop)."""
    if not data:
        raise InvalidMedia(f"{label}.data is empty; send the bytes of a PNG, JPEG or WebP file")
    if len(data) > limits.max_image_bytes:
        raise InvalidMedia(
            f"{label}.data is {_megabytes(len(data))}; the limit is {_megabytes(limits.max_image_bytes)} "
            f"(max_image_bytes={limits.max_image_bytes})"
        )
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, above its own bomb threshold; our limit is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InvalidMedia(f"{label}.data is not a decodable image (one of {', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError:
        # PIL's own guard fired while reading the header: far above any sane limit.
        raise InvalidMedia(
            f"{label}.data declares an image larger than the limit of {limits.max_image_pixels} pixels "
            "(max_image_pixels)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidMedia(f"{label}.data could not be read: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise InvalidMedia(f"{label}.data declares an empty image ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise InvalidMedia(
            f"{label}.data is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_image_pixels} pixels (max_image_pixels)"
        )
    return image


def load_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """Decode the pixels of an opened image to RGB (the expensive part: call it off the event loop)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:  # truncated or corrupt
        raise InvalidMedia(f"{label}.data could not be decoded: {exc}") from None


def decode_image(data: bytes, limits: ImageLimits, label: str = "image") -> Image.Image:
    """Check and decode an encoded image file to RGB, or raise :class:`InvalidMedia` naming ``label``."""
    return load_rgb(open_image(data, limits, label), label)
