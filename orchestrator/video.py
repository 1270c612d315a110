"""Video decoding with limits, and the frame sampling that turns one video into images.

The orchestrator decodes a request's video itself and sends every sampled frame to the vision
worker as a PNG. A video is checked as cheaply as possible, in this order: its size in bytes
before it is opened; its container format against an allow list as it is opened (after
probing, before that format's demuxer parses the file); the durations the container and the
stream declare, and the frame size the stream declares, before any frame is decoded. Only then
are frames decoded, in presentation order, stopping as soon as every sampled frame is in hand.
A target more than :data:`SEEK_GAP_SECONDS` past the last frame decoded is reached by seeking
(to the keyframe at or before one frame ahead of it, then decoding forward), so 16 frames from
a two-hour video cost about what 16 from a minute do and only a few decoded frames are held at
a time; nearer targets, files that declare no duration or start, and containers that refuse to
seek are decoded forward. Errors name the field under the caller's label and the limit, and
never carry FFmpeg's own messages.

Sampling rules (times in seconds from the start of the video stream, ``D`` its duration):

- **Even** (the default policy): ``n`` frames, the request's ``max_frames`` or the server's
  ``FrameSampling.frames``. The targets are the centres of ``n`` equal segments of ``D``,
  ``(i + 0.5) * D / n``.
- **fps**: when the request's ``fps`` (or else the server's ``FrameSampling.fps``) is > 0, the
  targets are ``0, 1/fps, 2/fps, ...`` while ``< D``. They are capped at the request's
  ``max_frames`` or else ``VideoLimits.max_frames``; when there would be more, the cap is
  spread evenly over ``D`` instead (as the even policy), so a long video is still covered end
  to end rather than cut off after its first seconds.
- Each target takes the decoded frame whose timestamp is nearest (a tie goes to the earlier
  frame). A frame nearest to several targets is returned once, so a video with fewer frames
  than targets gives each of its frames at most once. Frames come back in stream order.
- **Unknown duration** (neither the container nor the stream declares one, e.g. a raw H.264
  stream): its packets are counted by demuxing, which decodes nothing, up to
  :func:`frame_bound` (``max_duration_seconds`` x 60 fps: 36,000 by default), and the video
  is sampled among those frames as if frame ``i`` were at ``i / rate``, with ``rate`` the
  stream's own frame rate or 25 fps when it declares none. The same bound caps how many frames
  any video may have decoded, across all seeks; reaching it ends the stream.
- A frame's ``index`` is counted from the stream's start; once a seek has skipped frames, it is
  its timestamp x the frame rate, rounded (the same number for a constant-rate video).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.error
from PIL import Image

from squint.errors import InvalidMedia

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoLimits:
    """What the orchestrator accepts per video."""

    max_video_bytes: int = field(default=256 * 1024 * 1024, metadata={"help": "largest encoded video file"})
    max_duration_seconds: float = field(
        default=600.0, metadata={"help": "longest video, checked from the container's header before decoding"}
    )
    max_frames: int = field(
        default=64, metadata={"help": "most frames sampled from one video; a request's max_frames may not exceed it"}
    )
    max_frame_pixels: int = field(
        default=8_000_000, metadata={"help": "largest frame width x height, checked from the header before decoding"}
    )

    def __post_init__(self) -> None:
        for name in ("max_video_bytes", "max_duration_seconds", "max_frames", "max_frame_pixels"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"VideoLimits.{name} is {value!r}; it must be a positive number")


@dataclass(frozen=True)
class FrameSampling:
    """How frames are sampled when a request does not say; a request may override either field."""

    frames: int = field(default=8, metadata={"help": "frames sampled evenly over the duration (capped by max_frames)"})
    fps: float = field(
        default=0.0, metadata={"help": "when > 0, sample at this rate instead of evenly (capped by max_frames)"}
    )

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"FrameSampling.frames is {self.frames}; it must be at least 1")
        if not (math.isfinite(self.fps) and self.fps >= 0):
            raise ValueError(f"FrameSampling.fps is {self.fps}; it must be 0 (sample evenly) or a positive rate")


@dataclass(frozen=True)
class SampledFrame:
    """One frame taken from a video.

    image: the decoded frame, RGB, at the video's own size.
    timestamp: seconds from the start of the video stream (estimated as ``index / rate`` when
        the video declares no duration).
    index: the frame's number in the stream, counted from 0 in presentation order (after a seek,
        its timestamp x the frame rate, rounded).
    """

    image: Image.Image
    timestamp: float
    index: int


# Demuxers we open: the common video containers and raw streams. Everything else is refused
# before its demuxer runs: playlists and concat lists (hls, dash, concat) open other files or
# URLs, and rarely used demuxers are attack surface we do not need.
ALLOWED_FORMATS = (
    "mov",
    "mp4",
    "matroska",
    "webm",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "ogg",
    "ivf",
    "asf",
    "h264",
    "hevc",
    "m4v",
)
_FORMAT_NAMES = "MP4, WebM, MKV, AVI, MPEG-TS, ..."

# Frame rate assumed for a stream that declares none (FFmpeg assumes the same).
ASSUMED_FPS = 25.0
# frame_bound(): how many frames the longest allowed video holds at this rate.
MAX_FRAME_RATE = 60.0
# A target further than this past the last frame decoded is reached by seeking to the keyframe
# before it; a nearer one by decoding forward (a seek re-decodes from a keyframe).
SEEK_GAP_SECONDS = 10.0


def frame_bound(limits: VideoLimits) -> int:
    """The most frames decoded from one video, and the window sampled when the duration is unknown."""
    return math.ceil(limits.max_duration_seconds * MAX_FRAME_RATE)


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _check_overrides(limits: VideoLimits, label: str, max_frames: int, fps: float) -> None:
    if max_frames < 0:
        raise InvalidMedia(
            f"{label}.max_frames is {max_frames}; give 0 (the server default) or 1 to {limits.max_frames} (max_frames)"
        )
    if max_frames > limits.max_frames:
        raise InvalidMedia(f"{label}.max_frames is {max_frames}; the limit is {limits.max_frames} (max_frames)")
    if not math.isfinite(fps) or fps < 0:
        raise InvalidMedia(
            f"{label}.fps is {fps}; give 0 (the server default) or a positive number of frames per second"
        )


def _targets(duration: float, count: int, fps: float, cap: int) -> list[float]:
    """Sorted target times over ``[0, duration)``: ``count`` evenly, or every ``1/fps`` up to ``cap``."""
    if fps > 0:
        wanted = max(1, math.ceil(duration * fps))
        if wanted <= cap:
            return [k / fps for k in range(wanted)]
        count = cap  # too many at this rate: spread the cap over the whole video instead
    return [(i + 0.5) * duration / count for i in range(count)]


def _open(data: bytes, label: str) -> av.container.InputContainer:
    try:
        return av.open(
            io.BytesIO(data),
            mode="r",
            # Checked by FFmpeg after probing and before the demuxer reads the header.
            container_options={"format_whitelist": ",".join(ALLOWED_FORMATS)},
            metadata_errors="ignore",  # a badly encoded title must not fail the request
        )
    except (av.error.FFmpegError, OSError, ValueError, EOFError):
        raise InvalidMedia(f"{label}.data is not a decodable video ({_FORMAT_NAMES})") from None


def _declared_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[float | None, float]:
    """(the stream's duration or else the container's, the longest either declares); (None, 0) for neither."""
    stream_seconds = None
    if stream.duration is not None and stream.duration > 0 and stream.time_base:
        stream_seconds = float(stream.duration * stream.time_base)
    container_seconds = None
    if container.duration is not None and container.duration > 0:
        container_seconds = container.duration / av.time_base
    declared = [s for s in (stream_seconds, container_seconds) if s is not None]
    if not declared:
        return None, 0.0
    return (stream_seconds if stream_seconds is not None else container_seconds), max(declared)


def _frame_rate(stream: av.video.stream.VideoStream) -> float:
    rate = stream.guessed_rate or stream.average_rate
    return float(rate) if rate and rate > 0 else ASSUMED_FPS


def _count_packets(data: bytes, label: str, bound: int) -> int:
    """Video packets in the file, up to ``bound``: demuxing only, nothing is decoded."""
    count = 0
    with _open(data, label) as container:
        try:
            for packet in container.demux(container.streams.video[0]):
                if packet.size:  # the demuxer ends with an empty flush packet
                    count += 1
                    if count >= bound:
                        break
        except av.error.FFmpegError:
            pass  # a corrupt tail ends the count; decoding will stop there too
    return count


class _Decoder:
    """Decodes a stream's frames in presentation order, from the start or from a seek, counting
    every frame decoded against frame_bound() across all seeks; corruption after a frame ends the
    stream, and a frame larger than the limit is refused."""

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.video.stream.VideoStream,
        limits: VideoLimits,
        label: str,
    ) -> None:
        self.container, self.stream, self.limits, self.label = container, stream, limits, label
        self.count = 0
        self.bound = frame_bound(limits)
        self.seeks = 0

    def seek(self, seconds: float, origin: Fraction) -> None:
        """To the keyframe at or before ``seconds`` from ``origin``; the next :meth:`frames` decodes from there."""
        offset = math.floor((origin + Fraction(seconds)) / self.stream.time_base)
        self.container.seek(max(offset, 0), stream=self.stream, backward=True)
        self.seeks += 1

    def frames(self) -> Iterator[av.VideoFrame]:
        limits, label = self.limits, self.label
        try:
            for frame in self.container.decode(self.stream):
                if frame.width * frame.height > limits.max_frame_pixels:  # the size may change mid-stream
                    raise InvalidMedia(
                        f"{label}.data has a frame of {frame.width}x{frame.height} = {frame.width * frame.height} "
                        f"pixels; the limit is {limits.max_frame_pixels} pixels (max_frame_pixels)"
                    )
                self.count += 1
                yield frame
                if self.count >= self.bound:
                    logger.info("%s: stopped decoding after %d frames (the bound)", label, self.count)
                    return
        except av.error.FFmpegError as exc:
            if self.count == 0:
                raise InvalidMedia(f"{label}.data is not a decodable video ({_FORMAT_NAMES})") from None
            logger.info("%s: decoding stopped after %d frames: %s", label, self.count, exc)


def sample_frames(
    data: bytes,
    limits: VideoLimits,
    defaults: FrameSampling,
    label: str,
    max_frames: int = 0,
    fps: float = 0.0,
) -> list[SampledFrame]:
    """Check a video against ``limits`` and sample its frames, or raise :class:`InvalidMedia` naming ``label``.

    ``max_frames`` and ``fps`` are the request's overrides of ``defaults``, 0 meaning "the
    server default": in even sampling ``max_frames`` is the number of frames, in fps sampling
    their cap. The module docstring gives the rules. Decoding is CPU work: call this off the
    event loop.
    """
    _check_overrides(limits, label, max_frames, fps)
    if not data:
        raise InvalidMedia(f"{label}.data is empty; send the bytes of a video file ({_FORMAT_NAMES})")
    if len(data) > limits.max_video_bytes:
        raise InvalidMedia(
            f"{label}.data is {_megabytes(len(data))}; the limit is {_megabytes(limits.max_video_bytes)} "
            f"(max_video_bytes={limits.max_video_bytes})"
        )
    rate_fps = fps or defaults.fps
    count = max_frames or min(defaults.frames, limits.max_frames)
    cap = max_frames or limits.max_frames

    with _open(data, label) as container:
        if not container.streams.video:
            raise InvalidMedia(f"{label}.data is not a decodable video ({_FORMAT_NAMES}): it has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise InvalidMedia(
                f"{label}.data is not a decodable video ({_FORMAT_NAMES}): its video stream names no codec"
            )
        duration, longest = _declared_duration(container, stream)
        if longest > limits.max_duration_seconds:
            raise InvalidMedia(
                f"{label}.data declares a duration of {longest:.1f} s; the limit is "
                f"{limits.max_duration_seconds:.1f} s (max_duration_seconds)"
            )
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_frame_pixels:
            raise InvalidMedia(
                f"{label}.data has frames of {width}x{height} = {width * height} pixels; the limit is "
                f"{limits.max_frame_pixels} pixels (max_frame_pixels)"
            )
        # The decoder refuses far larger frames before allocating them, mid-stream size changes
        # included. Its check counts padded buffers (about 50k pixels more on a tiny frame), hence
        # the headroom; each decoded frame is then checked exactly.
        stream.codec_context.options = {"max_pixels": str(2 * limits.max_frame_pixels + (1 << 20))}

        rate = _frame_rate(stream)
        by_index = duration is None
        if by_index:
            frames_seen = _count_packets(data, label, frame_bound(limits))
            if frames_seen == 0:
                raise InvalidMedia(f"{label}.data is not a decodable video ({_FORMAT_NAMES}): it has no frames")
            duration = frames_seen / rate
            logger.debug("%s declares no duration; sampling among %d frames at %.3g fps", label, frames_seen, rate)
        targets = _targets(duration, count, rate_fps, cap)

        origin: Fraction | None = None
        if stream.start_time is not None and stream.time_base:
            origin = stream.start_time * stream.time_base
        # Seeking needs real timestamps and a known start; a file that declares neither is read
        # from the start, as are targets close together (decoding forward beats a seek's re-decode).
        can_seek = not by_index and origin is not None and bool(stream.time_base)
        decoder = _Decoder(container, stream, limits, label)

        def seconds(index: int, frame: av.VideoFrame) -> float:
            nonlocal origin
            if by_index or frame.pts is None or not frame.time_base:
                return index / rate
            time = frame.pts * frame.time_base
            if origin is None:
                origin = time  # no declared start: the first frame is the start
            return float(time - origin)

        taken: dict[int, SampledFrame] = {}

        def take(index: int, timestamp: float, frame: av.VideoFrame) -> None:
            if index not in taken:
                taken[index] = SampledFrame(image=frame.to_image(), timestamp=timestamp, index=index)

        # A target is settled by the first frame at or after it, against the frame before. Frames are
        # counted from the start until the first seek; after one, a frame's number is its time x rate.
        next_target = 0
        previous: tuple[int, float, av.VideoFrame] | None = None
        frames: Iterator[av.VideoFrame] | None = None
        index, sought = -1, -1
        try:
            while next_target < len(targets):
                target = targets[next_target]
                position = previous[1] if previous is not None else 0.0
                # One seek per target at most: the keyframe before it may itself be far behind.
                if can_seek and sought != next_target and target - position > SEEK_GAP_SECONDS:
                    sought = next_target
                    try:
                        # A frame early, so the frame before the target is decoded too (the nearest may be it).
                        decoder.seek(max(target - 1.0 / rate, 0.0), origin)
                    except av.error.FFmpegError as exc:
                        logger.info("%s: cannot seek (%s); decoding forward instead", label, exc)
                        can_seek = False
                    else:
                        if frames is not None:
                            frames.close()
                        frames, previous = None, None
                if frames is None:
                    frames = decoder.frames()
                frame = next(frames, None)
                if frame is None:
                    break  # the stream ended before the remaining targets
                index += 1
                timestamp = seconds(index, frame)
                if decoder.seeks:
                    index = round(timestamp * rate)
                while next_target < len(targets) and timestamp >= targets[next_target]:
                    target = targets[next_target]
                    if previous is not None and target - previous[1] <= timestamp - target:
                        take(*previous)
                    else:
                        take(index, timestamp, frame)
                    next_target += 1
                previous = (index, timestamp, frame)
        finally:
            if frames is not None:
                frames.close()  # before the container closes
        if next_target < len(targets) and previous is not None:
            take(*previous)  # the stream ended before these targets: the last frame is nearest
    if not taken:
        raise InvalidMedia(f"{label}.data is not a decodable video ({_FORMAT_NAMES}): it has no frames")
    return [taken[index] for index in sorted(taken)]


def frame_png(frame: SampledFrame) -> bytes:
    """The frame as PNG bytes: lossless, and the same bytes for the same frame (no metadata, fixed settings)."""
    buffer = io.BytesIO()
    # Level 1: the vision worker decodes it at once, so speed matters more than size.
    frame.image.save(buffer, format="PNG", compress_level=1, optimize=False)
    return buffer.getvalue()
