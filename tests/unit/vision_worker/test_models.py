"""CLIP runs only as deep as the compressors of a forward need, and computes what Hugging Face does."""

import io
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from compressor_plugins.protocol import CompressorInput
from compressor_plugins.registry import PluginSettings, load_compressors
from vision_worker.models import FeatureRequest, VisionModels


@pytest.fixture(scope="module")
def models(tiny_pack):
    return VisionModels(tiny_pack)


@contextmanager
def layer_calls(models):
    """Forward calls per CLIP vision encoder layer, counted while the block runs."""
    layers = models.clip.vision_model.encoder.layers
    calls = [0] * len(layers)
    hooks = [
        layer.register_forward_pre_hook(lambda _m, _a, index=index: calls.__setitem__(index, calls[index] + 1))
        for index, layer in enumerate(layers)
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


def images(png, count=2):
    return [Image.open(io.BytesIO(png(seed))).convert("RGB") for seed in range(count)]


def test_the_feature_layer_is_the_penultimate_of_the_tiny_pack(models):
    layers = len(models.clip.vision_model.encoder.layers)
    assert models.feature_layer == -2 and models.feature_index == layers - 1


@pytest.mark.parametrize("name", ["none", "avgpool", "dfmr", "staged_pool"])
def test_clip_stops_at_the_feature_layer_for_a_compressor_that_needs_nothing_later(models, png, name):
    needs = load_compressors(PluginSettings()).get(name).cls.needs
    request = FeatureRequest.for_needs(needs).image_part()
    with layer_calls(models) as calls:
        models.features_many(images(png), [request, request])
    # One batched forward through every layer up to the feature layer, none after it.
    assert calls == [1] * models.feature_index + [0] * (len(calls) - models.feature_index)


@pytest.mark.parametrize("name", ["text_recovery", "stf"])
def test_a_compressor_that_needs_the_last_layer_gets_it(models, png, name):
    needs = load_compressors(PluginSettings()).get(name).cls.needs
    assert needs & {CompressorInput.HIDDEN_STATES, CompressorInput.LAST_BLOCK_QK, CompressorInput.PROJECTED_PATCHES}
    request = FeatureRequest.for_needs(needs, "a question").image_part()
    with layer_calls(models) as calls:
        [features] = models.features_many(images(png, 1), [request])
    assert calls == [1] * len(calls)
    if name == "stf":
        assert len(features.hidden_states) == len(calls) + 1
    else:
        assert features.last_block_qk is not None and features.projected_patches is not None


def test_a_batch_runs_as_deep_as_its_deepest_request(models, png):
    shallow, deep = FeatureRequest(), FeatureRequest(projected_patches=True)
    with layer_calls(models) as calls:
        first, second = models.features_many(images(png), [shallow, deep])
    assert calls == [1] * len(calls)
    assert first.projected_patches is None and second.projected_patches is not None


def test_the_vision_tower_is_hugging_faces_bit_for_bit(models, png):
    pixels = torch.cat([models.pixel_values(image) for image in images(png, 3)])
    with torch.inference_mode():
        reference = models.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        every = models.vision_tower(pixels, last_layer=True, every=True)
        short = models.vision_tower(pixels, last_layer=False)
    assert len(every) == len(reference.hidden_states)
    for index, (ours, theirs) in enumerate(zip(every, reference.hidden_states, strict=True)):
        assert torch.equal(ours, theirs), f"hidden state {index} differs"
    assert torch.equal(every[-1], reference.last_hidden_state)
    # Stopped at the feature layer: that state is the same, and only it is kept.
    assert len(short) == models.feature_index + 1
    assert torch.equal(short[-1], reference.hidden_states[models.feature_layer])
    assert all(state is None for state in short[:-1])


def test_the_last_block_inputs_are_hugging_faces_bit_for_bit(models, png):
    [image] = images(png, 1)
    pixels = models.pixel_values(image)
    captured = {}
    attention = models.clip.vision_model.encoder.layers[-1].self_attn
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name, module in (("q", attention.q_proj), ("k", attention.k_proj))
    ]
    try:
        with torch.inference_mode():
            reference = models.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    request = FeatureRequest(cls_token=True, last_block_qk=True, projected_patches=True)
    [features] = models.features_many([image], [request])
    assert torch.equal(features.last_block_qk[0], captured["q"][0])
    assert torch.equal(features.last_block_qk[1], captured["k"][0])
    with torch.inference_mode():
        projected = models.clip.visual_projection(reference.last_hidden_state)[0]
    assert torch.equal(features.projected_patches, projected)
    assert torch.equal(features.cls_token, reference.hidden_states[-2][0, 0])
    assert torch.equal(features.patch_features, reference.hidden_states[-2][0, 1:])
