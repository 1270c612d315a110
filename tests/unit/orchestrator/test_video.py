"""Video checks and frame sampling, on videos written by the tests with PyAV."""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image
from squint_test_media import frame_number, make_video

import orchestrator.video as video_module
from orchestrator.media import Media, pixel_signature, pixel_similarity, repeated_frames
from orchestrator.video import FrameSampling, SampledFrame, VideoLimits, frame_png, sample_frames
from squint.errors import InvalidMedia

LABEL = "chunks[3].video"


def sample(
    data: bytes, limits: VideoLimits | None = None, defaults: FrameSampling | None = None, **overrides
) -> list[SampledFrame]:
    """``sample_frames`` under ``LABEL``, with the default limits and sampling unless given."""
    return sample_frames(data, limits or VideoLimits(), defaults or FrameSampling(), LABEL, **overrides)


def numbers(frames: list[SampledFrame]) -> list[int]:
    """The stream indices of ``frames``, after checking each image shows the frame it claims."""
    for frame in frames:
        assert frame_number(frame.image) == frame.index % 64, f"frame {frame.index} shows another frame's colour"
    return [frame.index for frame in frames]


@pytest.fixture(scope="module")
def video() -> bytes:
    """32 frames of 64 x 48 at 8 fps: 4 seconds, frame i at i / 8 s."""
    return make_video(32)


# Sampling


@pytest.mark.parametrize(
    "codec, container",
    [("mpeg4", "mp4"), ("libx264", "mp4"), ("libvpx", "webm"), ("mpeg4", "avi"), ("mpeg4", "matroska")],
)
def test_even_sampling_takes_the_centres_of_equal_segments(codec, container):
    # Targets 0.25, 0.75, ... 3.75 s: frames 2, 6, ... 30. MKV and WebM declare the duration only
    # on the container; libx264 reorders frames (B-frames).
    frames = sample(make_video(32, codec=codec, container=container))
    assert numbers(frames) == [2, 6, 10, 14, 18, 22, 26, 30]
    assert [frame.timestamp for frame in frames] == pytest.approx([0.25 + 0.5 * k for k in range(8)])
    assert all(frame.image.mode == "RGB" and frame.image.size == (64, 48) for frame in frames)


def test_max_frames_overrides_the_default_count(video):
    assert numbers(sample(video, max_frames=4)) == [4, 12, 20, 28]
    assert numbers(sample(video, max_frames=1)) == [16]
    assert numbers(sample(video, defaults=FrameSampling(frames=2))) == [8, 24]


def test_fps_sampling_from_the_request_or_the_server_default(video):
    assert numbers(sample(video, fps=2.0)) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert numbers(sample(video, defaults=FrameSampling(fps=1.0))) == [0, 8, 16, 24]
    # The request's rate wins over the server's.
    assert numbers(sample(video, defaults=FrameSampling(fps=1.0), fps=0.5)) == [0, 16]
    # A rate between frames takes the nearest frame: targets 0, 1/3, 2/3 s -> frames 0, 3 (2.67), 5 (5.33).
    assert numbers(sample(video, fps=3.0))[:3] == [0, 3, 5]


def test_fps_sampling_over_the_cap_is_spread_evenly(video):
    # 32 targets at 8 fps, capped at 4: the 4 are spread over the whole video, not the first half second.
    assert numbers(sample(video, fps=8.0, max_frames=4)) == [4, 12, 20, 28]
    assert numbers(sample(video, fps=8.0, limits=VideoLimits(max_frames=2))) == [8, 24]


def test_more_targets_than_frames_give_each_frame_once(video):
    assert numbers(sample(make_video(3), max_frames=8)) == [0, 1, 2]
    # 400 targets at 100 fps, capped at 64 and spread: every one of the 32 frames, once, in order.
    assert numbers(sample(video, fps=100.0)) == list(range(32))
    assert numbers(sample(make_video(1))) == [0]


def test_a_stream_without_a_duration_is_sampled_by_frame_number():
    raw = make_video(32, codec="libx264", container="h264")
    probe = av.open(io.BytesIO(raw))
    assert probe.duration is None and probe.streams.video[0].duration is None  # the case under test
    probe.close()
    frames = sample(raw)
    assert numbers(frames) == [2, 6, 10, 14, 18, 22, 26, 30]
    # The stream's own rate (8 fps, from its SPS) gives the timestamps.
    assert [frame.timestamp for frame in frames] == pytest.approx([i / 8 for i in numbers(frames)])


def test_same_bytes_give_the_same_frames_and_png_bytes(video):
    first, second = sample(video, max_frames=5), sample(video, max_frames=5)
    assert numbers(first) == numbers(second)
    assert [frame_png(f) for f in first] == [frame_png(f) for f in second]
    assert [f.timestamp for f in first] == [f.timestamp for f in second]


def test_frame_png_is_lossless(video):
    frame = sample(video, max_frames=1)[0]
    png = frame_png(frame)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = Image.open(io.BytesIO(png))
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(frame.image))


# Long videos: seeking


def _decoded_frames(monkeypatch) -> list[int]:
    """Counts, in a list of one, every frame the sampler decodes."""
    counter = [0]
    frames = video_module._Decoder.frames

    def counting(self):
        for frame in frames(self):
            counter[0] += 1
            yield frame

    monkeypatch.setattr(video_module._Decoder, "frames", counting)
    return counter


@pytest.fixture(scope="module")
def half_hour() -> bytes:
    """30 minutes at 1 fps, a keyframe every 12 s: long enough that sampling seeks."""
    return make_video(1800, fps=1, keyframe_every=12)


@pytest.mark.parametrize(
    "codec, container",
    [("mpeg4", "mp4"), ("libx264", "mp4"), ("libvpx", "webm"), ("mpeg4", "avi"), ("mpeg4", "matroska")],
)
def test_seeking_takes_the_frames_decoding_from_the_start_would(codec, container, monkeypatch):
    # 4 minutes at 1 fps: 16 targets 15 s apart (more than SEEK_GAP_SECONDS), so each is sought.
    data = make_video(240, fps=1, codec=codec, container=container, keyframe_every=12)
    limits = VideoLimits(max_frames=64)
    sought = sample(data, limits, max_frames=16)
    monkeypatch.setattr(video_module, "SEEK_GAP_SECONDS", math.inf)
    read_through = sample(data, limits, max_frames=16)
    assert numbers(sought) == numbers(read_through) == [7 + 15 * k for k in range(16)]
    assert [f.timestamp for f in sought] == [f.timestamp for f in read_through]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(sought, read_through))


def test_seeking_decodes_only_near_each_target(half_hour, monkeypatch):
    decoded = _decoded_frames(monkeypatch)
    frames = sample(half_hour, VideoLimits(max_duration_seconds=3600), max_frames=16)
    # Centres of 16 segments of 112.5 s: 56.25 s, 168.75 s, ...; the nearest frame, a tie to the earlier.
    assert numbers(frames) == [math.ceil(56.25 + 112.5 * k - 0.5) for k in range(16)]
    # Each target costs at most one GOP (12 frames) and the frame after it; reading through would be ~1,750.
    assert decoded[0] <= 16 * 14
    monkeypatch.setattr(video_module, "SEEK_GAP_SECONDS", math.inf)
    decoded[0] = 0
    assert numbers(sample(half_hour, VideoLimits(max_duration_seconds=3600), max_frames=16)) == numbers(frames)
    assert decoded[0] > 1700


def test_a_container_that_cannot_seek_is_read_through(half_hour, monkeypatch):
    def refuse(self, offset, **kwargs):
        raise av.error.FFmpegError(1, "seek refused")

    reference = numbers(sample(half_hour, VideoLimits(max_duration_seconds=3600), max_frames=4))
    monkeypatch.setattr(av.container.InputContainer, "seek", refuse, raising=False)
    assert numbers(sample(half_hour, VideoLimits(max_duration_seconds=3600), max_frames=4)) == reference


def _best_seconds(videos: Sequence[bytes], limits: VideoLimits, repeats: int = 9) -> list[float]:
    """Each video's fastest sampling of 16 frames, the videos taken in turn, so that a burst of
    load from elsewhere on the machine slows one round of each rather than all of one."""
    best = [math.inf] * len(videos)
    for _ in range(repeats):
        for i, data in enumerate(videos):
            start = time.perf_counter()
            assert len(sample(data, limits, max_frames=16)) == 16
            best[i] = min(best[i], time.perf_counter() - start)
    return best


_PEAK_RSS = """
import json, resource, sys
sys.path[:0] = sys.argv[2:]
import orchestrator.video as video_module
from orchestrator.video import FrameSampling, VideoLimits, sample_frames
data = open(sys.argv[1], "rb").read()
limits = VideoLimits(max_duration_seconds=3 * 3600)
sample_frames(data, limits, FrameSampling(frames=1), "v")  # warm up: FFmpeg's own start-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
frames = sample_frames(data, limits, FrameSampling(frames=16), "v")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"frames": len(frames), "growth_kib": after - before, "bytes": len(data)}))
"""


def test_sixteen_frames_of_two_hours_cost_about_what_sixteen_of_a_minute_do(tmp_path):
    # Issue 17: a generated 2-hour low-frame-rate video (0.5 fps) against 1 minute of the same format.
    two_hours = make_video(3600, fps=Fraction(1, 2), keyframe_every=12)
    one_minute = make_video(30, fps=Fraction(1, 2), keyframe_every=12)
    limits = VideoLimits(max_duration_seconds=3 * 3600)
    long_seconds, short_seconds = _best_seconds([two_hours, one_minute], limits)
    print(f"16 frames: 2 h {long_seconds * 1000:.1f} ms, 1 min {short_seconds * 1000:.1f} ms")
    assert long_seconds < 3 * short_seconds
    # Peak memory, in a fresh process: sampling holds a few decoded frames, not the video's length.
    growth = {}
    for name, data in (("two_hours", two_hours), ("one_minute", one_minute)):
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(data)
        run = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(path), *sys.path],
            capture_output=True,
            text=True,
            check=True,
        )
        growth[name] = json.loads(run.stdout)["growth_kib"]
    print(f"peak RSS growth while sampling: 2 h {growth['two_hours']} KiB, 1 min {growth['one_minute']} KiB")
    assert growth["two_hours"] <= growth["one_minute"] + 8 * 1024


# Request overrides and their limits


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"max_frames": 500}, "chunks[3].video.max_frames is 500; the limit is 64 (max_frames)"),
        ({"max_frames": 65}, "chunks[3].video.max_frames is 65; the limit is 64 (max_frames)"),
        ({"max_frames": -1}, "chunks[3].video.max_frames is -1"),
        ({"fps": -1.0}, "chunks[3].video.fps is -1.0"),
        ({"fps": math.nan}, "chunks[3].video.fps is nan"),
        ({"fps": math.inf}, "chunks[3].video.fps is inf"),
    ],
)
def test_overrides_beyond_the_limits_are_refused_not_clamped(video, overrides, expected):
    with pytest.raises(InvalidMedia) as caught:
        sample(video, **overrides)
    assert caught.value.message.startswith(expected)


def test_max_frames_up_to_the_limit_is_accepted(video):
    assert len(sample(video, max_frames=64)) == 32
    assert len(sample(video, max_frames=3, limits=VideoLimits(max_frames=3))) == 3


# Limits on the video itself


def test_too_many_bytes_are_refused_before_opening(video):
    with pytest.raises(InvalidMedia) as caught:
        sample(b"\0" * 2048, limits=VideoLimits(max_video_bytes=1024))  # not a video: never opened
    assert caught.value.message == ("chunks[3].video.data is 0.0 MiB; the limit is 0.0 MiB (max_video_bytes=1024)")
    sample(video, limits=VideoLimits(max_video_bytes=len(video)))


def test_too_long_a_duration_is_refused(video):
    with pytest.raises(InvalidMedia) as caught:
        sample(video, limits=VideoLimits(max_duration_seconds=3.5))
    assert caught.value.message == (
        "chunks[3].video.data declares a duration of 4.0 s; the limit is 3.5 s (max_duration_seconds)"
    )
    assert len(sample(video, limits=VideoLimits(max_duration_seconds=4.0))) == 8


def test_too_large_a_frame_is_refused(video):
    with pytest.raises(InvalidMedia) as caught:
        sample(video, limits=VideoLimits(max_frame_pixels=64 * 48 - 1))
    assert caught.value.message == (
        "chunks[3].video.data has frames of 64x48 = 3072 pixels; the limit is 3071 pixels (max_frame_pixels)"
    )
    assert len(sample(video, limits=VideoLimits(max_frame_pixels=64 * 48))) == 8


def _ten_hours_declared() -> bytes:
    """32 frames (4 s) in Matroska whose Segment Duration says ten hours."""
    data = make_video(32, container="matroska")
    at = data.index(b"\x44\x89\x88")  # EBML ID of Duration, then size 8: a big-endian double, in ms
    assert struct.unpack(">d", data[at + 3 : at + 11]) == (4000.0,)
    return data[: at + 3] + struct.pack(">d", 10 * 3600 * 1000.0) + data[at + 11 :]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_ten_hours_declared, id="mkv-header-claims-10h"),
        pytest.param(lambda: make_video(2, pts=[0, 8 * 10 * 3600]), id="mp4-two-frames-10h-apart"),
    ],
)
def test_a_ten_hour_header_is_refused_before_decoding(make):
    data = make()
    start = time.perf_counter()
    with pytest.raises(InvalidMedia) as caught:
        sample(data)
    elapsed = time.perf_counter() - start
    assert caught.value.message.startswith("chunks[3].video.data declares a duration of 3600")
    assert caught.value.message.endswith("the limit is 600.0 s (max_duration_seconds)")
    assert elapsed < 1.0


# Bytes that are not a video


def _audio_only() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as output:
        stream = output.add_stream("aac", rate=8000, layout="mono")
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, k * 1024
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()


def _no_frames(container: str) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        output.start_encoding()  # write the header although no frame follows
    return buffer.getvalue()


def _cut_after_handler() -> bytes:
    """An MP4 cut right after its video track's handler: a video stream, but no codec (found by the fuzz test)."""
    data = make_video(4)
    handler = data.index(b"hdlr")
    assert data[handler + 12 : handler + 16] == b"vide"
    return data[: handler + 16]


@pytest.mark.parametrize(
    "make, reason",
    [
        pytest.param(lambda: b"this is not a video file" * 40, "", id="garbage"),
        pytest.param(lambda: bytes(range(256)) * 64, "", id="binary-garbage"),
        pytest.param(lambda: make_video(32)[:600], "", id="truncated-mp4"),
        pytest.param(_cut_after_handler, ": its video stream names no codec", id="mp4-cut-before-its-codec"),
        pytest.param(_audio_only, ": it has no video stream", id="audio-only"),
        pytest.param(lambda: _no_frames("mp4"), "", id="empty-mp4"),
        pytest.param(lambda: _no_frames("matroska"), "", id="empty-mkv"),
        # A concat list would open other files on the server: its demuxer is not allowed.
        pytest.param(lambda: b"ffconcat version 1.0\nfile video.mp4\n", "", id="concat-list"),
        pytest.param(lambda: b"#EXTM3U\n#EXTINF:4.0,\nvideo.mp4\n#EXT-X-ENDLIST\n", "", id="hls-playlist"),
    ],
)
def test_undecodable_bytes_are_refused_without_ffmpeg_details(make, reason):
    with pytest.raises(InvalidMedia) as caught:
        sample(make())
    message = caught.value.message
    assert message.startswith("chunks[3].video.data is not a decodable video (MP4, WebM, MKV, AVI, MPEG-TS, ...)")
    assert message.endswith(reason) and "Errno" not in message and "\n" not in message


def test_empty_bytes_are_refused():
    with pytest.raises(InvalidMedia, match=r"^chunks\[3\]\.video\.data is empty"):
        sample(b"")


# Settings


def test_settings_refuse_nonsense_at_start_up():
    with pytest.raises(ValueError, match="FrameSampling.frames"):
        FrameSampling(frames=0)
    with pytest.raises(ValueError, match="FrameSampling.fps"):
        FrameSampling(fps=-2.0)
    with pytest.raises(ValueError, match="VideoLimits.max_duration_seconds"):
        VideoLimits(max_duration_seconds=math.inf)


# Pixel signatures: repeats found before CLIP


def test_a_small_change_is_not_a_repeat_but_compression_noise_is():
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    moved = scene.copy()
    moved[:12, :16] = 255 - moved[:12, :16]  # one sixteenth of the frame changes
    noisy = np.clip(scene.astype(np.int16) + rng.integers(-6, 7, scene.shape), 0, 255).astype(np.uint8)
    signature = pixel_signature(Image.fromarray(scene))
    assert pixel_similarity(signature, signature) == 1.0
    assert pixel_similarity(signature, pixel_signature(Image.fromarray(noisy))) >= 0.96
    assert pixel_similarity(signature, pixel_signature(Image.fromarray(moved))) < 0.9


def test_repeats_are_judged_against_the_last_frame_analysed_so_a_slow_drift_still_ends_them():
    # Grey levels 0, 4, 8, ...: each frame 4 levels (0.016 of full scale) from the one before.
    frames = [
        Media(0, "video_frame", f"f{i}", b"", "", signature=pixel_signature(Image.new("RGB", (32, 32), (4 * i,) * 3)))
        for i in range(8)
    ]
    image = Media(1, "image", "i", b"", "")
    assert repeated_frames([*frames, image], 0.96) == [None, 0, 0, None, 3, 3, None, 6, None]
    assert repeated_frames(frames, 1.5) == [None] * 8  # off
