import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from compressor_plugins.protocol import LLMDirective
from compressor_plugins.registry import PluginSettings, load_compressors
from squint.errors import BudgetExceeded, CompressorNotFound, InvalidMedia, InvalidRequest
from vision_worker.cache import InProcessCache
from vision_worker.encoder import EncodeItem, VisionEncoder
from vision_worker.images import ImageLimits
from vision_worker.models import VisionModels


@pytest.fixture(scope="module")
def encoder(tiny_pack):
    return VisionEncoder(
        VisionModels(tiny_pack), load_compressors(PluginSettings()), InProcessCache(1 << 28), ImageLimits()
    )


def run(coro):
    """Run one call, then the cache writes it started once it had answered."""

    async def call_and_writes():
        result = await coro
        await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))
        return result

    return asyncio.run(call_and_writes())


def test_tokens_equal_hugging_face_image_features(encoder, tiny_pack, png):
    data = png(7, 260, 180)
    [item] = run(encoder.encode([EncodeItem(data)]))
    processor = AutoProcessor.from_pretrained(tiny_pack.llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_pack.llava_dir)
    pixel_values = processor.image_processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output[0]
    assert item.tokens.shape == (576, 64) and item.tokens_before == 576
    np.testing.assert_array_equal(item.tokens, expected.numpy())


def test_avgpool_projects_pooled_patches(encoder, png):
    [plain, pooled] = run(encoder.encode([EncodeItem(png(1)), EncodeItem(png(1), "avgpool", {"stride": 3})]))
    assert pooled.tokens.shape == (64, 64) and pooled.tokens_before == 576 and pooled.compressor == "avgpool"
    assert not np.allclose(plain.tokens[:64], pooled.tokens)


def test_second_encode_is_a_cache_hit_with_the_same_tokens(encoder, png):
    [first] = run(encoder.encode([EncodeItem(png(2), "avgpool")]))
    [second] = run(encoder.encode([EncodeItem(png(2), "avgpool")]))
    assert not first.cache_hit and second.cache_hit and first.cache_key == second.cache_key
    np.testing.assert_array_equal(first.tokens, second.tokens)


def test_budget_cap_is_enforced_with_numbers(encoder, png):
    with pytest.raises(
        BudgetExceeded, match=r"'none' emits 576 visual tokens for chunks\[0\].image; the budget allows 100"
    ):
        run(encoder.encode([EncodeItem(png(3), max_tokens=100, label="chunks[0].image")]))


def test_every_item_is_checked_before_any_is_computed(encoder, png):
    with pytest.raises(InvalidMedia, match=r"items\[1\].image.data is not a decodable image"):
        run(encoder.encode([EncodeItem(png(4)), EncodeItem(b"junk")]))
    with pytest.raises(CompressorNotFound):
        run(encoder.encode([EncodeItem(png(4), "nope")]))
    with pytest.raises(InvalidRequest, match="no images"):
        run(encoder.encode([]))


def test_a_compressor_breaking_its_own_prediction_is_named(encoder, png):
    from compressor_plugins.builtin.avgpool import AvgPool2d

    class Liar(AvgPool2d):
        def predict_tokens(self, grid, params):
            return 7

    encoder._compressors["avgpool"] = Liar()
    try:
        with pytest.raises(
            RuntimeError, match=r"compressor 'avgpool' returned 144 tokens, but it predicted 7 for items\[0\].image"
        ):
            run(encoder.encode([EncodeItem(png(9), "avgpool", {"stride": 2})]))
    finally:
        encoder._compressors["avgpool"] = AvgPool2d()


def test_analyze_keeps_features_so_encode_skips_clip(encoder, png, monkeypatch):
    [analysis] = run(encoder.analyze([EncodeItem(png(5), "avgpool", {"stride": 2})]))
    assert analysis.grid == (24, 24) and analysis.tokens_before == 576 and analysis.natural_tokens == 144
    assert analysis.levels[0] == 144 and 64 in analysis.levels and not analysis.features_cached
    assert analysis.descriptor.shape == (32,) and abs(float((analysis.descriptor**2).sum()) - 1) < 1e-5
    calls = []
    monkeypatch.setattr(encoder.models, "features", lambda *a: calls.append(a))  # CLIP must not run again
    [held] = run(encoder.encode([EncodeItem(png(5), "avgpool", {"stride": 2}, max_tokens=64)]))
    [natural] = run(encoder.encode([EncodeItem(png(5), "avgpool", {"stride": 2}, max_tokens=200)]))
    assert held.tokens_after == 64 and not held.cache_hit
    # A later Encode at the natural count reads what Analyze cached.
    assert natural.tokens_after == 144 and natural.cache_hit
    assert held.cache_key != natural.cache_key and not calls
    [again] = run(encoder.analyze([EncodeItem(png(5), "avgpool", {"stride": 2})]))
    assert again.features_cached


def test_dfmr_analysis_reports_complexity_and_its_ladder(encoder, png):
    [analysis] = run(encoder.analyze([EncodeItem(png(6), "dfmr")]))
    assert analysis.complexity is not None and analysis.natural_tokens == analysis.levels[0]
    assert list(analysis.levels) == sorted(analysis.levels, reverse=True) and analysis.levels[-1] == 1


def test_a_third_party_budget_fitting_compressor_is_held_to_the_budget_through_compress_within(encoder, png):
    from compressor_plugins.protocol import CompressedImage, CompressorInput, OutputSpace
    from compressor_plugins.registry import CompressorRegistry

    class FirstPatches:
        """Both budget methods, as docs/plugins.md asks: the worker must call compress_within."""

        name = "first_patches"
        summary = "the first patches"
        params = ()
        needs = frozenset({CompressorInput.PATCH_FEATURES})
        output_space = OutputSpace.VISION
        budgets: list[int] = []

        def predict_tokens(self, grid, params):
            return grid[0] * grid[1]

        def compress(self, features, params):
            return self.compress_within(features, params, features.patch_features.shape[0])

        def compress_within(self, features, params, budget):
            FirstPatches.budgets.append(budget)
            return CompressedImage(tokens=features.patch_features[:budget], covers=tuple((i,) for i in range(budget)))

        def token_levels(self, grid, params, natural):
            return tuple(range(natural, 0, -1))

    registry = CompressorRegistry()
    registry.register(FirstPatches)
    worker = VisionEncoder(encoder.models, registry, InProcessCache(1 << 26), ImageLimits(), "first_patches")
    [item] = run(worker.encode([EncodeItem(png(5), max_tokens=100)]))
    assert item.tokens_after == 100 and FirstPatches.budgets == [100]


def test_a_directive_and_its_record_survive_the_token_cache(encoder, png):
    params = {"layer": 1, "stride": 4, "shape": "2d", "reference_mode": True}
    item = EncodeItem(png(10), "staged_pool", params)
    [fresh] = run(encoder.encode([item]))
    [cached] = run(encoder.encode([item]))
    assert not fresh.cache_hit and cached.cache_hit
    assert fresh.directive == cached.directive == LLMDirective(layer=1, stride=4, shape="2d", reference_mode=True)
    assert (fresh.tokens_before, fresh.grid, fresh.complexity) == (cached.tokens_before, cached.grid, cached.complexity)
    assert fresh.covers == cached.covers and len(fresh.covers) == fresh.tokens_after == 576
    np.testing.assert_array_equal(fresh.tokens, cached.tokens)


def test_params_are_resolved_once_per_setting_not_per_item_or_call(encoder, png, monkeypatch):
    import vision_worker.encoder as module

    resolved = []
    real = module.resolve_params
    monkeypatch.setattr(
        module, "resolve_params", lambda compressor, raw: resolved.append(dict(raw)) or real(compressor, raw)
    )
    # One item per call: the module's encoder holds a lock an earlier test's event loop bound.
    first, second = EncodeItem(png(11), "avgpool", {"stride": 4.0}), EncodeItem(png(12), "avgpool", {"stride": 4.0})
    run(encoder.analyze([first]))
    run(encoder.analyze([second]))
    counts = [item.tokens_after for call in ([first], [second]) for item in run(encoder.encode(call))]
    assert resolved == [{"stride": 4.0}] and counts == [36, 36]
    with pytest.raises(InvalidRequest, match="stride"):  # a bad setting is refused every time, never kept
        run(encoder.encode([EncodeItem(png(11), "avgpool", {"stride": 0})]))
    with pytest.raises(InvalidRequest, match="stride"):
        run(encoder.encode([EncodeItem(png(11), "avgpool", {"stride": 0})]))
