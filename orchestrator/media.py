"""A request's images and video frames, in prompt order, each ready for the vision workers."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from orchestrator.types import Chunk, ImageChunk, VideoChunk
from orchestrator.video import FrameSampling, VideoLimits, frame_png, sample_frames
from squint.errors import InvalidRequest


@dataclass(frozen=True)
class Media:
    """One image, or one sampled video frame, as a vision worker will see it."""

    chunk_index: int  # the chunk it came from
    kind: str  # "image" or "video_frame"
    label: str  # how errors name it: "chunks[2].image", "chunks[3].video.frames[5]"
    data: bytes  # encoded image file (frames: lossless PNG)
    content_hash: str  # sha256 of data: routing and cache identity
    timestamp: float | None = None  # frames: seconds from the video's start
    max_tokens: int = 0  # a cap on its visual tokens whatever the budget (0: none)
    signature: bytes = b""  # frames: pixel_signature(), to skip repeats before CLIP


# A frame's pixel signature: a thumbnail of this size, each cell the mean of its pixels, so
# compression noise averages out while any region that changes still shows.
SIGNATURE_SIZE = (16, 16)


def pixel_signature(image: Image.Image) -> bytes:
    """A cheap signature of a decoded frame: its RGB thumbnail of SIGNATURE_SIZE, box-filtered."""
    return image.convert("RGB").resize(SIGNATURE_SIZE, Image.Resampling.BOX).tobytes()


def pixel_similarity(a: bytes, b: bytes) -> float:
    """1 less the largest change of any thumbnail cell and channel, as a share of full scale (1: identical)."""
    change = np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8).astype(np.int16))
    return 1.0 - float(change.max()) / 255.0


def repeated_frames(media: Sequence[Media], threshold: float) -> list[int | None]:
    """For each item, the position of the earlier frame of its video that it repeats by its pixels
    (``pixel_similarity >= threshold`` to the last frame not itself a repeat), else None.

    Images, a video's first frame, and every frame when ``threshold > 1`` are never repeats.
    These frames are skipped before CLIP; comparing with the last frame kept (not the one just
    before) means a slow drift still ends a run of repeats.
    """
    repeats: list[int | None] = [None] * len(media)
    last: dict[int, int] = {}
    for i, m in enumerate(media):
        if m.kind != "video_frame" or threshold > 1.0:
            continue
        previous = last.get(m.chunk_index)
        if previous is not None and pixel_similarity(m.signature, media[previous].signature) >= threshold:
            repeats[i] = previous
        else:
            last[m.chunk_index] = i
    return repeats


def expand_media(
    chunks: Sequence[Chunk],
    limits: VideoLimits,
    sampling: FrameSampling,
    max_items: int,
    labels: Sequence[str] | None = None,
) -> list[Media]:
    """Every image and every sampled frame, in prompt order (video decoding happens here).

    Stops as soon as ``max_items`` is passed, before decoding further videos. ``labels`` name the
    chunks in errors (default ``chunks[i]``).
    """
    labels = labels or [f"chunks[{i}]" for i in range(len(chunks))]
    media: list[Media] = []
    for index, chunk in enumerate(chunks):
        if len(media) > max_items:
            break
        if isinstance(chunk, ImageChunk):
            media.append(
                Media(
                    index,
                    "image",
                    f"{labels[index]}.image",
                    chunk.data,
                    hashlib.sha256(chunk.data).hexdigest(),
                    max_tokens=chunk.max_tokens,
                )
            )
        elif isinstance(chunk, VideoChunk):
            label = f"{labels[index]}.video"
            for number, frame in enumerate(
                sample_frames(chunk.data, limits, sampling, label, chunk.max_frames, chunk.fps)
            ):
                data = frame_png(frame)
                media.append(
                    Media(
                        index,
                        "video_frame",
                        f"{label}.frames[{number}]",
                        data,
                        hashlib.sha256(data).hexdigest(),
                        frame.timestamp,
                        signature=pixel_signature(frame.image),
                    )
                )
    if len(media) > max_items:
        raise InvalidRequest(
            f"the request has more than {max_items} images and video frames; the limit is {max_items} (max_media_items)"
        )
    return media
