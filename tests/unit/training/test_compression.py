"""Training with --dfmr pools with the dfmr compressor itself, and --llavolta with the staged_pool
compressor and the LLM engine's staged decoder: the same code as serving."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaForConditionalGeneration

from compressor_plugins.builtin.dfmr import DynamicFeatureMapReduction
from compressor_plugins.protocol import ImageFeatures, resolve_params
from llm_worker import staged
from llm_worker.spans import ImageSpan
from llm_worker.staged import StagedDecoder
from training.compression import DFMRTraining, LlavoltaTraining, STFTraining, parse_llavolta
from training.data import IGNORE, Conversation, encode
from training.features import FeatureLlava


def _features(side: int = 24, width: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(side * side, width, generator=generator)


def test_random_draws_every_factor_and_pools_as_avg_pool2d(tiny_pack):
    training = DFMRTraining("random", tiny_pack, (24, 24), seed=1)
    features = _features()
    counts = Counter()
    for _ in range(60):
        rows = training(features)
        counts[rows.shape[0]] += 1
        side = int(rows.shape[0] ** 0.5)
        factor = 24 // side
        grid = features.T.reshape(1, -1, 24, 24)
        expected = F.avg_pool2d(grid, factor).reshape(features.shape[1], -1).T
        torch.testing.assert_close(rows, expected)
    assert set(counts) == {576, 144, 64} and min(counts.values()) >= 10


def test_dynamic_is_the_compressor_choosing_by_sigma_bar(tiny_pack):
    training = DFMRTraining("dynamic", tiny_pack, (24, 24))
    features = _features()
    compressor = DynamicFeatureMapReduction()
    expected = compressor.compress(ImageFeatures(features, (24, 24)), resolve_params(compressor, {})).tokens
    torch.testing.assert_close(training(features), expected)
    flat = torch.ones(576, 8)  # no variability: the largest factor
    assert training(flat).shape[0] == 64


def test_training_calls_the_serving_compressor(tiny_pack, monkeypatch):
    calls = []
    original = DynamicFeatureMapReduction.compress

    def spy(self, features, params):
        calls.append(params["force_factor"])
        return original(self, features, params)

    monkeypatch.setattr(DynamicFeatureMapReduction, "compress", spy)
    DFMRTraining("random", tiny_pack, (24, 24))(_features())
    assert len(calls) == 1 and calls[0] in (1, 2, 3)


def test_unknown_mode_is_refused(tiny_pack):
    with pytest.raises(ValueError, match="--dfmr 'sometimes' is not one of random, dynamic"):
        DFMRTraining("sometimes", tiny_pack, (24, 24))


# --------------------------------------------------------------------------- LLaVolta


def test_llavolta_schedules_parse_and_bad_ones_name_the_stage():
    stages = parse_llavolta("2:8:0.25,2:2:0.25,16:2:0.25,none:0.25")
    expected = [(2, 8, 0.25), (2, 2, 0.25), (16, 2, 0.25), (None, 1, 0.25)]
    assert [(s.layer, s.stride, s.share) for s in stages] == expected
    assert parse_llavolta("-1:4:0.5,none:0.5")[0].layer == -1
    for bad, message in [
        ("2:8", "stage '2:8' is not LAYER:STRIDE:SHARE"),
        ("2:8:0.5,none:0.4", "shares add up to 0.9, not 1"),
        ("2:8:1", "the last stage is uncompressed"),
        ("2:1:0.5,none:0.5", "stride >= 2"),
        ("-2:4:0.5,none:0.5", "layer >= -1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_llavolta(bad)


def test_llavolta_stages_switch_at_their_share_of_the_steps(tiny_pack):
    training = LlavoltaTraining(parse_llavolta("0:8:0.3,1:2:0.3,none:0.4"), 10, 2, tiny_pack)
    assert training.pivots == (3, 6, 10)
    assert [str(training.stage_at(step)) for step in (0, 2, 3, 5, 6, 9, 10)] == [
        "layer 0, stride 8",
        "layer 0, stride 8",
        "layer 1, stride 2",
        "layer 1, stride 2",
        "none",
        "none",
        "none",
    ]
    with pytest.raises(ValueError, match=r"layer 2, stride 4: the LLM has 2 decoder layers \(0..1\)"):
        LlavoltaTraining(parse_llavolta("2:4:0.5,none:0.5"), 10, 2, tiny_pack)


class _Clock:
    step = 0


def _llavolta_batch(tiny_pack, answers):
    """A right-padded batch of one-turn conversations about random pictures, encoded as training does."""
    from orchestrator.prompting import PromptBuilder

    prompts = PromptBuilder(tiny_pack)
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_pack.llava_dir, dtype=torch.float32).eval()
    width = llava.config.vision_config.hidden_size
    encoded = [
        encode(Conversation(str(i), Path("picture.png"), (("<image>\nWhat?", answer),)), prompts, 576)
        for i, answer in enumerate(answers)
    ]
    longest = max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(encoded), longest, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, (sample_ids, sample_labels) in enumerate(encoded):
        ids[row, : len(sample_ids)] = torch.tensor(sample_ids)
        labels[row, : len(sample_labels)] = torch.tensor(sample_labels)
        mask[row, : len(sample_ids)] = 1
    rows = torch.randn(len(answers) * 576, width, generator=torch.Generator().manual_seed(3))
    return llava, {"input_ids": ids, "labels": labels, "attention_mask": mask, "image_rows": rows}, encoded


@pytest.mark.parametrize("schedule", ["1:4:0.5,none:0.5", "0:8:0.5,none:0.5", "-1:4:0.5,none:0.5"])
def test_a_llavolta_stage_trains_on_what_the_llm_engine_computes_when_serving(tiny_pack, schedule):
    llava, batch, encoded = _llavolta_batch(tiny_pack, ["no", "a circle"])
    training = LlavoltaTraining(parse_llavolta(schedule), 10, 2, tiny_pack)
    stage = training.stage_at(0)
    with torch.no_grad():
        loss = FeatureLlava(llava, training, _Clock()).forward(**batch).loss
        # Serving: the staged_pool compressor's rows and directive, the engine's prefill with a
        # cache, then one decode step per answer token, positions continuing from the unpooled length.
        decoder = StagedDecoder(llava.model.language_model, llava.lm_head)
        embed = llava.get_input_embeddings()
        projected = llava.model.multi_modal_projector(batch["image_rows"])
        image = llava.config.image_token_index
        losses = []
        for row, (ids, labels) in enumerate(encoded):
            start = ids.index(image)
            prompt_end = next(i for i, label in enumerate(labels) if label != IGNORE)
            features = slice(row * 576, (row + 1) * 576)
            tokens, directive = training.compress(batch["image_rows"][features], projected[features], (24, 24), stage)
            before, after = embed(torch.tensor(ids[:start])), embed(torch.tensor(ids[start + 576 : prompt_end]))
            spans = [ImageSpan.placed(directive, start, tokens.shape[0])] if directive is not None else []
            cache = decoder.new_cache()
            prefill = decoder.prefill(torch.cat([before, tokens, after])[None], spans, cache)
            logits = decoder.head(prefill.hidden[0, -1:])
            position = start + tokens.shape[0] + len(after)  # the length spliced, before any in-LLM pooling
            for target in labels[prompt_end:]:
                losses.append(F.cross_entropy(logits, torch.tensor([target])))
                logits = decoder.decode(torch.tensor([target]), torch.tensor([position]), [cache])
                position += 1
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-4, atol=1e-4)
    # Uncompressed (the last stage) is LLaVA's own forward.
    clock = _Clock()
    clock.step = 9
    with torch.no_grad():
        plain = FeatureLlava(llava).forward(**batch).loss
        torch.testing.assert_close(FeatureLlava(llava, training, clock).forward(**batch).loss, plain)
    assert not torch.allclose(loss, plain)


def test_llavolta_training_calls_the_serving_compressor_and_engine(tiny_pack, monkeypatch):
    from compressor_plugins.builtin.staged_pool import StagedPooling

    calls = []
    compress, pool = StagedPooling.compress, staged.pool_span
    monkeypatch.setattr(StagedPooling, "compress", lambda self, f, p: calls.append(p["layer"]) or compress(self, f, p))
    monkeypatch.setattr(staged, "pool_span", lambda *a: calls.append(a[2].layer) or pool(*a))
    llava, batch, _ = _llavolta_batch(tiny_pack, ["no", "a circle"])
    training = LlavoltaTraining(parse_llavolta("1:4:0.5,none:0.5"), 10, 2, tiny_pack)
    FeatureLlava(llava, training, _Clock()).forward(**batch).loss.backward()
    assert calls == [1, 1, 1, 1]  # per sample: the compressor's directive, then the engine pooling at layer 1
    assert llava.model.multi_modal_projector.linear_1.weight.grad is not None


# --------------------------------------------------------------------------- STF


def test_stf_training_runs_the_stf_compressors_module_and_saves_where_it_loads(tiny_pack, tmp_path):
    import shutil

    from compressor_plugins.builtin.stf import SpatialTokenFusion
    from squint.packs import load_pack

    shutil.copytree(tiny_pack.root, tmp_path / "pack")
    pack = load_pack(tmp_path / "pack")
    training = STFTraining(pack, vision_depth=24)
    generator = torch.Generator().manual_seed(4)
    width = training.model.config.vision_width
    hidden_states = tuple(torch.randn(1 + 576, width, generator=generator) for _ in range(25))
    served = SpatialTokenFusion()
    served.load_weights(pack.compressor_dirs["stf"], torch.device("cpu"), torch.float32)
    features = ImageFeatures(torch.zeros(576, width), (24, 24), hidden_states=hidden_states)
    params = resolve_params(served, {})
    with torch.no_grad():
        torch.testing.assert_close(
            training.model(training.features(hidden_states), 24), served.compress(features, params).tokens
        )
        for parameter in training.model.parameters():
            parameter.add_(0.01)
        training.save()
        reloaded = SpatialTokenFusion()
        reloaded.load_weights(pack.compressor_dirs["stf"], torch.device("cpu"), torch.float32)
        torch.testing.assert_close(
            training.model(training.features(hidden_states), 24), reloaded.compress(features, params).tokens
        )
    assert training.tokens((24, 24)) == 144


def test_stf_training_needs_the_packs_stf_folder(tiny_pack):
    import dataclasses

    with pytest.raises(ValueError, match="--stf trains the pack's stf weights, and this pack names none"):
        STFTraining(dataclasses.replace(tiny_pack, compressor_dirs={}), vision_depth=24)


def test_stf_training_refuses_a_clip_its_block_list_does_not_fit(tiny_pack, tmp_path):
    # The serve-time check, before the first step.
    import shutil

    from squint.packs import load_pack

    shutil.copytree(tiny_pack.root, tmp_path / "pack")
    pack = load_pack(tmp_path / "pack")
    config = Path(pack.compressor_dirs["stf"]) / "config.json"
    blocks = json.loads(config.read_text())["blocks"]  # the tiny pack names the released list
    with pytest.raises(ValueError, match=r"gives only 5 hidden states \(4 blocks\): \[23, 21, .*\] out of range"):
        STFTraining(pack, vision_depth=4)
    config.unlink()  # no list: the released one, which is for a 24-block CLIP only
    with pytest.raises(ValueError, match="released block list .* is for a 24-block CLIP, this CLIP has 23 blocks"):
        STFTraining(pack, vision_depth=23)
    assert STFTraining(pack, vision_depth=24).blocks == tuple(blocks)
    config.write_text(json.dumps({"blocks": [4, 3, 2, 1, 0, -1, -2, -5]}))
    assert STFTraining(pack, vision_depth=4).blocks == (4, 3, 2, 1, 0, -1, -2, -5)
