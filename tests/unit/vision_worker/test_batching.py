import asyncio

import torch
from PIL import Image

from vision_worker.batching import BatchingSettings, MicroBatcher
from vision_worker.metrics import VisionMetrics
from vision_worker.models import FeatureRequest, VisionModels


class Recorder:
    """A stand-in for CLIP that records each batch it was given (unit test: no model)."""

    def __init__(self, fail: bool = False):
        self.batches, self.fail = [], fail

    def __call__(self, images, requests):
        self.batches.append(len(images))
        if self.fail:
            raise RuntimeError("forward failed")
        return [f"features of {image}" for image in images]


def run(batcher_settings, count, recorder):
    async def scenario():
        batcher = MicroBatcher(recorder, asyncio.Lock(), batcher_settings, VisionMetrics())
        return await asyncio.gather(
            *(batcher.submit(f"img{i}", FeatureRequest()) for i in range(count)), return_exceptions=True
        )

    return asyncio.run(scenario())


def test_concurrent_images_share_forwards_up_to_max_batch():
    recorder = Recorder()
    results = run(BatchingSettings(max_batch=4, max_wait_ms=5), 10, recorder)
    assert results == [f"features of img{i}" for i in range(10)]  # each caller gets its own, in order
    assert recorder.batches == [4, 4, 2]


def test_max_batch_one_turns_batching_off():
    recorder = Recorder()
    run(BatchingSettings(max_batch=1, max_wait_ms=0), 3, recorder)
    assert recorder.batches == [1, 1, 1]


def test_a_failed_forward_fails_every_caller_of_that_batch():
    results = run(BatchingSettings(max_batch=8, max_wait_ms=1), 3, Recorder(fail=True))
    assert all(isinstance(r, RuntimeError) for r in results)


def test_a_cancelled_caller_leaves_the_others_their_results():
    recorder = Recorder()

    async def scenario():
        batcher = MicroBatcher(recorder, asyncio.Lock(), BatchingSettings(max_batch=8, max_wait_ms=20), VisionMetrics())
        tasks = [asyncio.create_task(batcher.submit(f"img{i}", FeatureRequest())) for i in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, second, third = asyncio.run(scenario())
    assert (first, third) == ("features of img0", "features of img2")
    assert isinstance(second, asyncio.CancelledError) and recorder.batches == [2]


def test_a_batched_forward_equals_single_forwards(tiny_pack, png):
    import io

    models = VisionModels(tiny_pack)
    images = [Image.open(io.BytesIO(png(seed))).convert("RGB") for seed in range(3)]
    request = FeatureRequest(last_block_qk=True, projected_patches=True, llm_tokens=True)
    batched = models.features_many(images, [request] * 3)
    for image, together in zip(images, batched):
        alone = models.features(image, request)
        torch.testing.assert_close(together.patch_features, alone.patch_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.last_block_qk[0], alone.last_block_qk[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.llm_tokens, alone.llm_tokens, atol=1e-5, rtol=1e-5)


def test_a_long_thin_image_is_shrunk_before_padding_to_square(tiny_pack, monkeypatch) -> None:
    # 962 x 33845 is within the pixel limit, but padded to square it would be 1.1 gigapixels.
    models = VisionModels(tiny_pack)
    seen: list[tuple[int, int]] = []
    processor = models.image_processor

    def spy(images, **kwargs):
        seen.append(images.size)
        return processor(images=images, **kwargs)

    monkeypatch.setattr(models, "image_processor", spy)
    thin = Image.new("RGB", (962, 33845), (120, 30, 200))
    assert models.pixel_values(thin).shape[-2:] == models.pixel_values(Image.new("RGB", (64, 64))).shape[-2:]
    assert seen[0] == (round(962 * 4096 / 33845), 4096)
    assert seen[1] == (64, 64)  # images within PRESHRINK_SIDE go to the processor as they are
