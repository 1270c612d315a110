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


def decode_image(data: bytes, limits: ImageLimits, label: str = "image") -> Image.Image:
    """Decode an encoded image file to RGB, or raise :class:`InvalidMedia` naming ``label``."""
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
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise InvalidMedia(f"{label}.data declares an empty image ({width}x{height})")
            if width * height > limits.max_image_pixels:
                raise InvalidMedia(
                    f"{label}.data is {width}x{height} = {width * height} pixels; the limit is "
                    f"{limits.max_image_pixels} pixels (max_image_pixels)"
                )
            image.load()
            return image.convert("RGB")
    except InvalidMedia:
        raise
    except UnidentifiedImageError:
        raise InvalidMedia(f"{label}.data is not a decodable image (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError:
        # PIL's own guard fired while reading the header: far above any sane limit.
        raise InvalidMedia(
            f"{label}.data declares an image larger than the limit of {limits.max_image_pixels} pixels "
            "(max_image_pixels)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt payloads
        raise InvalidMedia(f"{label}.data could not be decoded: {exc}") from None
