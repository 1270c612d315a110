"""The bench's media: seeded pictures, each stamped so that no cache has seen it, and videos of them."""

from __future__ import annotations

import hashlib
import io
import os
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw


def _stamp(nonce: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{nonce}/{index}".encode()).digest()[:8], "big")


def picture(seed: int, stamp: int, size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A seeded picture (gradient and shapes) with ``stamp``'s 64 bits drawn in its corner, so
    every stamp is a different image to the cache and to CLIP."""
    rng = np.random.RandomState(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    start, end = rng.randint(0, 256, 3), rng.randint(0, 256, 3)
    t = ((x / width + y / height) / 2)[..., None]
    image = Image.fromarray((start * (1 - t) + end * t).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randint(0, width - 20), rng.randint(0, height - 20)
        box = [x0, y0, x0 + rng.randint(15, width // 2), y0 + rng.randint(15, height // 2)]
        colour = tuple(int(c) for c in rng.randint(0, 256, 3))
        (draw.ellipse if rng.rand() < 0.5 else draw.rectangle)(box, fill=colour)
    for bit in range(64):
        on = (stamp >> bit) & 1
        cx, cy = (bit % 8) * 5, (bit // 8) * 5
        draw.rectangle([cx, cy, cx + 4, cy + 4], fill=(255, 255, 255) if on else (0, 0, 0))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Images:
    """Fresh images for the run: every call gives one nobody has cached (a per-run nonce)."""

    def __init__(self, size: tuple[int, int], nonce: str | None = None) -> None:
        self.size = size
        self.nonce = nonce or os.urandom(8).hex()
        self._next = 0

    def fresh(self, seed: int = 0) -> bytes:
        self._next += 1
        return png_bytes(picture(seed, _stamp(self.nonce, self._next), self.size))

    def video(self, frames: int, fps: int = 8, side: int = 336) -> bytes:
        """An MP4 of ``frames`` different pictures (none a near-duplicate of the one before)."""
        import av

        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4") as output:
            stream = output.add_stream("mpeg4", rate=fps)
            stream.width = stream.height = side
            stream.pix_fmt = "yuv420p"
            for i in range(frames):
                self._next += 1
                pixels = np.asarray(picture(1000 + i, _stamp(self.nonce, self._next), (side, side)))
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                for packet in stream.encode(frame):
                    output.mux(packet)
            for packet in stream.encode():
                output.mux(packet)
        return buffer.getvalue()
