"""Many images and a video under one budget, across two vision-worker processes."""

from __future__ import annotations

import pytest
from squint_test_media import make_video

from squint.generate.v1 import generate_pb2 as pb
from squint.wire import compressor_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def budget_request(png, base_seed: int, policy: str = "") -> pb.GenerateRequest:
    chunks = [pb.Chunk(text="Compare these pictures and the clip.")]
    chunks += [pb.Chunk(image=pb.Image(data=png(base_seed + i, 200 + 10 * i, 150))) for i in range(8)]
    chunks.append(pb.Chunk(video=pb.Video(data=make_video(32, size=(96, 64)), max_frames=32)))
    chunks.append(pb.Chunk(text="What changes?"))
    return pb.GenerateRequest(
        chunks=chunks,
        visual_token_budget=576,
        compressor=compressor_spec("avgpool"),
        sampling=pb.SamplingParams(max_new_tokens=4),
        allocation_policy=policy,
        dedup_threshold=1.5,  # off: all 32 frames are kept and must fit beside the 8 images
    )


def test_eight_images_and_a_32_frame_video_fit_576_tokens_and_repeat_from_cache(
    two_worker_client, two_worker_stack, png, unseen_seed
):
    first = two_worker_client.Generate(budget_request(png, unseen_seed), timeout=300)
    media = first.usage.media
    assert len(first.token_ids) == 4
    assert [m.kind for m in media] == ["image"] * 8 + ["video_frame"] * 32
    assert sum(m.tokens_after for m in media) == first.usage.visual_tokens <= 576
    assert all(m.tokens_after == m.allocated_tokens >= 1 for m in media)
    assert first.usage.allocation_policy == "uniform" and first.usage.visual_token_budget == 576
    frames = [m for m in media if m.kind == "video_frame"]
    assert [round(m.timestamp_seconds, 3) for m in frames] == sorted(round(m.timestamp_seconds, 3) for m in frames)
    # The content-hash ring spreads the 40 items over both workers.
    assert {m.worker for m in media} == set(two_worker_stack.vision_addresses)

    second = two_worker_client.Generate(budget_request(png, unseen_seed), timeout=300)
    again = second.usage.media
    assert all(m.cache_hit for m in again), [m.cache_hit for m in again]
    assert [m.worker for m in again] == [m.worker for m in media]  # cache affinity: same item, same worker
    assert list(second.token_ids) == list(first.token_ids)


def test_the_complexity_policy_and_duplicate_frames(two_worker_client, png):
    request = budget_request(png, 7, policy="complexity")
    request.ClearField("dedup_threshold")  # the server's default: near-identical frames are dropped
    chunks = list(request.chunks)
    # A video whose frames repeat: 4 distinct colours, each held for 8 frames.
    still = make_video(32, size=(96, 64), hold=8)
    chunks[9] = pb.Chunk(video=pb.Video(data=still, max_frames=32))
    del request.chunks[:]
    request.chunks.extend(chunks)
    reply = two_worker_client.Generate(request, timeout=300)
    assert reply.usage.allocation_policy == "complexity"
    assert sum(m.tokens_after for m in reply.usage.media) <= 576
    frames = [(position, m) for position, m in enumerate(reply.usage.media) if m.kind == "video_frame"]
    kept = [position for position, m in frames if not m.HasField("duplicate_of")]
    assert len(frames) == 32 and kept == [8, 16, 24, 32]  # one frame per colour survives
    for position, m in frames:
        if m.HasField("duplicate_of"):
            assert m.tokens_after == 0 and m.duplicate_of in kept and m.duplicate_of < position


# avgpool's counts are coarse (144, 64, 36, ...): three quarters of 288 leaves room for one step up.
@pytest.mark.parametrize(("compressor", "share"), [("avgpool", 0.75), ("text_recovery", 0.6)])
def test_complexity_gives_a_busy_image_more_than_a_plain_one_whatever_the_compressor(
    two_worker_client, compressor, share
):
    import io

    import numpy as np
    from PIL import Image

    def png_of(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    plain = png_of(Image.new("RGB", (336, 336), (90, 90, 90)))
    busy = png_of(Image.fromarray(np.random.RandomState(11).randint(0, 255, (336, 336, 3), dtype=np.uint8)))

    def allocation(policy: str, first: bytes, second: bytes, budget: int) -> list[tuple[int, float]]:
        reply = two_worker_client.Generate(
            pb.GenerateRequest(
                chunks=[
                    pb.Chunk(image=pb.Image(data=first)),
                    pb.Chunk(image=pb.Image(data=second)),
                    pb.Chunk(text="Which?"),
                ],
                visual_token_budget=budget,
                compressor=compressor_spec(compressor),
                allocation_policy=policy,
                sampling=pb.SamplingParams(max_new_tokens=1),
            ),
            timeout=300,
        )
        assert budget == 0 or reply.usage.visual_tokens <= budget
        return [(m.tokens_after, m.complexity) for m in reply.usage.media]

    # Unbudgeted first: each image's natural count (text_recovery's depends on the image).
    (plain_natural, _), (busy_natural, _) = allocation("complexity", plain, busy, 0)
    budget = int((plain_natural + busy_natural) * share)
    (plain_tokens, plain_sigma), (busy_tokens, busy_sigma) = allocation("complexity", plain, busy, budget)
    assert busy_sigma > plain_sigma  # every item has a complexity, not only DFMR's
    # The richer image keeps more of its own tokens; the plain one is not starved (its floor is a
    # quarter of the budget, rounded to one of its counts).
    assert busy_tokens / busy_natural > plain_tokens / plain_natural
    assert plain_tokens >= min(plain_natural, budget // 4) // 2
    # In the other order too (not "the earlier item"), and uniform splits otherwise.
    [(busy_first, _), (plain_second, _)] = allocation("complexity", busy, plain, budget)
    assert (busy_first, plain_second) == (busy_tokens, plain_tokens)
    assert allocation("uniform", plain, busy, budget) != [(plain_tokens, plain_sigma), (busy_tokens, busy_sigma)]


def test_a_budget_that_cannot_fit_is_resource_exhausted_with_the_numbers(two_worker_client, png):
    import grpc

    request = budget_request(png, 3)
    request.visual_token_budget = 20
    with pytest.raises(grpc.RpcError) as raised:
        two_worker_client.Generate(request, timeout=300)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the 40 media items need at least 40 visual tokens" in raised.value.details()
    assert "visual_token_budget is 20" in raised.value.details()


def _vision_sample(stack, name: str, **labels) -> float:
    """A sample of the stack's vision workers' metrics pages, summed over the workers."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for url in stack.vision_metrics_urls:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
    return total


def _clip_forwards(stack) -> float:
    """CLIP forwards (micro-batches) run so far."""
    return _vision_sample(stack, "squint_vision_compute_seconds_count", stage="clip")


def _clip_images(stack) -> float:
    """Images CLIP has run on so far."""
    return _vision_sample(stack, "squint_vision_batch_size_sum")


def test_a_request_that_cannot_fit_is_refused_before_any_clip_forward(
    two_worker_stack, two_worker_client, png, unseen_seed
):
    import grpc

    request = pb.GenerateRequest(
        chunks=[pb.Chunk(image=pb.Image(data=png(unseen_seed + i))) for i in range(8)] + [pb.Chunk(text="Compare.")],
        visual_token_budget=600,
        compressor=compressor_spec("none"),  # every patch: 576 per picture whatever the picture
        sampling=pb.SamplingParams(max_new_tokens=2),
    )
    before = _clip_forwards(two_worker_stack)
    with pytest.raises(grpc.RpcError) as raised:
        two_worker_client.Generate(request, timeout=300)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the 8 media items need at least 4608 visual tokens" in raised.value.details()
    assert _clip_forwards(two_worker_stack) == before  # no CLIP forward ran
    # One picture fits: it is analysed (the counter moves, so the check above can fail).
    del request.chunks[1:8]
    two_worker_client.Generate(request, timeout=300)
    assert _clip_forwards(two_worker_stack) > before


def _four_scenes(seed: int) -> bytes:
    """32 frames of 4 shapes-world scenes, each held for 8 frames with a little sensor noise."""
    import numpy as np
    from PIL import Image

    from evaluation.world import WorldSettings, draw_scene, encode_video, make_scene

    rng = np.random.default_rng(seed)
    settings = WorldSettings(size=96)
    scenes = [np.asarray(draw_scene(make_scene(settings, "test", seed + k)), np.int16) for k in range(4)]
    frames = (
        Image.fromarray(np.clip(scene + rng.integers(-3, 4, scene.shape), 0, 255).astype(np.uint8))
        for scene in scenes
        for _ in range(8)
    )
    return encode_video(frames, 96)


def test_a_clip_of_four_scenes_runs_clip_on_a_few_frames_and_keeps_what_clip_would(
    two_worker_stack, two_worker_client, unseen_seed
):

    def ask(**thresholds) -> pb.GenerateResponse:
        request = pb.GenerateRequest(
            chunks=[
                pb.Chunk(video=pb.Video(data=_four_scenes(unseen_seed), max_frames=32)),
                pb.Chunk(text="What happens?"),
            ],
            compressor=compressor_spec("avgpool"),
            sampling=pb.SamplingParams(max_new_tokens=4),
            **thresholds,
        )
        return two_worker_client.Generate(request, timeout=300)

    before = _clip_images(two_worker_stack)
    skipping = ask()
    forwards = _clip_images(two_worker_stack) - before
    frames = skipping.usage.frames
    assert len(skipping.token_ids) == 4  # the answer arrives
    assert frames.sampled == 32 and frames.analysed <= 8 and forwards == frames.analysed
    assert sum(m.skipped_before_clip for m in skipping.usage.media) == 32 - frames.analysed
    # Today's result, with only the pass after CLIP: every frame analysed.
    after_clip = ask(pixel_dedup_threshold=2.0)
    assert after_clip.usage.frames.analysed == 32
    kept = [i for i, m in enumerate(skipping.usage.media) if not m.HasField("duplicate_of")]
    kept_after_clip = [i for i, m in enumerate(after_clip.usage.media) if not m.HasField("duplicate_of")]
    print(f"CLIP ran on {forwards:.0f} frames; kept {kept}; kept by the pass after CLIP alone {kept_after_clip}")
    assert abs(len(kept) - len(kept_after_clip)) <= 1
    assert all(min(abs(i - j) for j in kept_after_clip) <= 1 for i in kept)
    assert skipping.usage.frames.kept == len(kept)


def test_the_accounting_is_also_metrics(two_worker_stack, two_worker_client, png, unseen_seed):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple], float]:
        text = urllib.request.urlopen(two_worker_stack.orchestrator_metrics_url, timeout=10).read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    before = scrape()
    reply = two_worker_client.Generate(budget_request(png, unseen_seed), timeout=300)
    after = scrape()

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("squint_visual_tokens_total", stage="after") == reply.usage.visual_tokens
    assert moved("squint_visual_tokens_total", stage="before") == 40 * 576
    frames = {
        outcome: moved(
            "squint_media_items_total", kind="video_frame", compressor="avgpool", policy="uniform", outcome=outcome
        )
        for outcome in ("computed", "cache_hit")
    }
    assert sum(frames.values()) == 32  # the same clip as the earlier tests: its frames may be cached
    assert (
        moved("squint_media_items_total", kind="image", compressor="avgpool", policy="uniform", outcome="computed") == 8
    )
    per_worker = sum(moved("squint_vision_worker_items_total", worker=w) for w in two_worker_stack.vision_addresses)
    assert per_worker == 40
    assert moved("squint_requests_total", finish_reason="length") == 1
