"""A request's images and video frames, in prompt order, each ready for the vision workers."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

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
                    )
                )
    if len(media) > max_items:
        raise InvalidRequest(
            f"the request has more than {max_items} images and video frames; the limit is {max_items} (max_media_items)"
        )
    return media
