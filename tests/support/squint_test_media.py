"""Test media: videos whose frames say which frame they are (used by unit and integration tests).

On pytest's path through ``pythonpath = ["tests/support"]`` in pyproject.toml.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
from PIL import Image

# Four levels per channel, 85 apart: 64 flat colours that survive lossy coding and YUV 4:2:0.
_LEVELS = (0, 85, 170, 255)


def frame_colour(i: int) -> tuple[int, int, int]:
    """The flat RGB colour of frame ``i`` (0..63) in :func:`make_video`."""
    return (_LEVELS[i % 4], _LEVELS[(i // 4) % 4], _LEVELS[(i // 16) % 4])


def frame_number(image: Image.Image) -> int:
    """Which frame of :func:`make_video` ``image`` is, from its mean colour."""
    mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return min(range(64), key=lambda i: float(np.sum((mean - frame_colour(i)) ** 2)))


def make_video(
    frames: int,
    size: tuple[int, int] = (64, 48),
    fps: int | Fraction = 8,
    codec: str = "mpeg4",
    *,
    container: str | None = None,
    pts: Sequence[int] | None = None,
    hold: int = 1,
    keyframe_every: int = 0,
) -> bytes:
    """A small video file: ``frames`` flat frames, frame ``i`` of colour ``frame_colour(i % 64)``.

    ``container`` defaults to WebM for ``libvpx`` and MP4 otherwise (``"h264"`` writes a raw
    H.264 stream, which declares no duration). ``pts`` sets each frame's presentation time in
    units of ``1/fps`` seconds; by default frame ``i`` is at ``i / fps``. ``hold`` shows each
    colour for that many consecutive frames (near-identical frames, for de-duplication).
    ``keyframe_every`` sets the encoder's GOP size in frames (0: the encoder's default).
    """
    if container is None:
        container = "webm" if codec == "libvpx" else "mp4"
    width, height = size
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if keyframe_every:
            stream.codec_context.gop_size = keyframe_every
        for i in range(frames):
            pixels = np.empty((height, width, 3), dtype=np.uint8)
            pixels[:] = frame_colour((i // hold) % 64)  # hold > 1 repeats each colour: duplicate frames
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i if pts is None else pts[i]
            frame.time_base = 1 / Fraction(fps)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def png_claiming(width: int, height: int, colour_type: int = 2, depth: int = 8) -> bytes:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 32))
        + chunk(b"IEND", b"")
    )
