"""The bench's helpers that need no servers: KV accounting, images, memory, presets, step counts."""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest
from PIL import Image

from bench.floors import prefill_prompts, prompt_ids
from bench.kv import KVShape, in_llm_pooling, kv_bytes
from bench.media import Images
from bench.probes import PeakMemory, descendants, sample_sum
from bench.results import Row, Sample, aggregate
from bench.run import baseline_count, needs_staged_orchestrator, total_steps
from bench.settings import CASES, FULL, QUICK, BenchSettings, Case
from bench.stack_runs import engines_moved

SHAPE = KVShape(layers=12, kv_heads=12, head_dim=64, dtype_bytes=4)


def test_kv_bytes_counts_every_layer_and_every_fed_token():
    per_token = 2 * 12 * 64 * 4  # K and V, float32
    assert SHAPE.per_token_layer == per_token
    # 618 prompt tokens and 8 generated: the last generated token is never fed back.
    assert kv_bytes(SHAPE, 618, 8) == 12 * (618 + 7) * per_token
    assert kv_bytes(SHAPE, 618, 0) == 12 * 618 * per_token


def test_kv_bytes_of_a_span_pooled_inside_the_llm():
    # 576 image tokens pooled 4:1 from layer 2: layers 0 and 1 hold all, layers 2..11 hold 432 fewer.
    full = kv_bytes(SHAPE, 618, 8)
    pooled = kv_bytes(SHAPE, 618, 8, [(2, 432)])
    assert full - pooled == 10 * 432 * SHAPE.per_token_layer
    assert kv_bytes(SHAPE, 618, 8, [(0, 432)]) == kv_bytes(SHAPE, 618 - 432, 8)


def test_in_llm_pooling_reads_the_compressor_defaults():
    assert in_llm_pooling(Case("staged_pool layer=2", "staged_pool", {"layer": 2}), 576) == [(2, 576 - 144)]
    assert in_llm_pooling(Case("x", "staged_pool", {"layer": 3, "stride": 2, "shape": "2d"}), 576) == [(3, 576 - 144)]
    assert in_llm_pooling(Case("x", "staged_pool", {"layer": 1, "stride": 5}), 576) == [(1, 576 - 115)]
    assert in_llm_pooling(Case("staged_pool layer=-1", "staged_pool", {"layer": -1}), 576) == []
    assert in_llm_pooling(Case("avgpool", "avgpool"), 576) == []


def test_kv_shape_of_a_pack(tmp_path):
    config = {
        "text_config": {"num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2, "hidden_size": 96}
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert KVShape.of_pack(tmp_path, dtype_bytes=2) == KVShape(layers=3, kv_heads=2, head_dim=16, dtype_bytes=2)


def test_fresh_images_never_repeat_and_a_nonce_reproduces_them():
    images = Images((120, 90), nonce="fixed")
    first = [images.fresh() for _ in range(3)]
    assert len(set(first)) == 3
    again = Images((120, 90), nonce="fixed")
    assert [again.fresh() for _ in range(3)] == first
    assert Images((120, 90), nonce="other").fresh() != first[0]
    picture = Image.open(io.BytesIO(first[0]))
    assert picture.format == "PNG" and picture.size == (120, 90)


def test_video_has_the_frames_asked_for():
    import av

    video = Images((64, 48), nonce="v").video(frames=5, side=64)
    with av.open(io.BytesIO(video)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].size == (64, 64)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_resets_and_sees_a_new_peak():
    memory = PeakMemory(lambda: ["self"])
    block = bytearray(64 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1  # touch every page
    high = memory.peak_bytes()
    del block
    memory.reset()
    assert memory.peak_bytes() < high - 32 * 1024 * 1024
    assert descendants(os.getpid())[0] == os.getpid()


def test_presets():
    assert [(c.name, c.engine) for c in CASES] == [
        ("none", "vllm"),
        ("avgpool", "vllm"),
        ("dfmr", "vllm"),
        ("staged_pool layer=-1", "vllm"),
        ("staged_pool layer=2", "staged"),
        ("text_recovery", "vllm"),
        ("stf", "vllm"),
        ("none", "staged"),
    ]
    assert FULL.streams == QUICK.streams == (1, 4, 16) and FULL.llm_max_batch >= max(FULL.streams)
    assert FULL.stream_engines == ("vllm", "staged") and QUICK.stream_engines == ("vllm",)
    assert FULL.clients == QUICK.clients == (1, 4, 8)
    assert (FULL.media_images, FULL.video_frames, FULL.media_budget) == (8, 16, 576)
    assert QUICK.repeats < FULL.repeats and QUICK.max_new_tokens < FULL.max_new_tokens
    with pytest.raises(ValueError, match="BenchSettings.repeats is 0"):
        BenchSettings(repeats=0)
    with pytest.raises(ValueError, match="BenchSettings.stream_engines has 'hf'"):
        BenchSettings(stream_engines=("hf",))


def test_a_case_names_its_engine_and_pooling_inside_the_llm_needs_the_staged_one():
    assert Case("x", "staged_pool", {"layer": 1}).engine == "staged"
    assert Case("x", "staged_pool", {"layer": -1}).engine == "vllm"
    assert Case("x", "none", engine="staged").engine == "staged" and not Case("x", "none").pools_in_llm
    with pytest.raises(ValueError, match="only the 'staged' engine serves"):
        Case("x", "staged_pool", {"layer": 2}, engine="vllm")
    with pytest.raises(ValueError, match="engine 'hf'"):
        Case("x", "none", engine="hf")
    assert needs_staged_orchestrator(BenchSettings(cases=CASES[:5], stream_engines=("vllm",))) is False
    assert needs_staged_orchestrator(BenchSettings(cases=CASES, stream_engines=("vllm",))) is True
    assert needs_staged_orchestrator(BenchSettings(cases=CASES[:1], stream_engines=("vllm", "staged"))) is True


def test_gauges_and_counters_are_read_per_model():
    text = "\n".join(
        [
            "# TYPE squint_llm_kv_cache_bytes gauge",
            'squint_llm_kv_cache_bytes{model="squint_llm",version="1"} 1024',
            'squint_llm_kv_cache_bytes{model="squint_llm_staged",version="1"} 4096',
            'squint_llm_generated_tokens_total{model="squint_llm",version="1"} 10',
            'squint_llm_generated_tokens_total{model="squint_llm_staged",version="1"} 3',
        ]
    )
    assert sample_sum(text, "squint_llm_kv_cache_bytes") == 5120
    assert sample_sum(text, "squint_llm_kv_cache_bytes", {"model": "squint_llm"}) == 1024
    assert sample_sum(text, "squint_llm_kv_cache_bytes", {"model": "squint_llm_staged"}) == 4096
    assert sample_sum(text, "squint_llm_active_sequences") == 0
    assert engines_moved({"vllm": 10, "staged": 3}, {"vllm": 12, "staged": 3}) == "vllm"
    assert engines_moved({"vllm": 10, "staged": 3}, {"vllm": 10, "staged": 3}) == ""
    assert engines_moved({}, {"vllm": 1, "staged": 1}) == "vllm+staged"


def test_floor_prompts_and_ids():
    def row(name: str, engine: str, cache: str, prompt: int, visual: int) -> Row:
        return aggregate(name, name, cache, [Sample(1.0, 2.0, 3, prompt, visual)], engine=engine)

    rows = [
        row("none", "vllm", "cold", 618, 576),
        row("none", "vllm", "warm", 618, 576),
        row("dfmr", "vllm", "cold", 618, 576),
        row("avgpool", "vllm", "cold", 186, 144),
        row("staged_pool layer=2", "staged", "cold", 618, 576),
        row("none", "staged", "cold", 618, 576),
    ]
    assert prefill_prompts(rows, {"staged_pool layer=2"}) == [
        ("vllm", 618, 576),
        ("vllm", 186, 144),
        ("staged", 618, 576),
    ]
    ids = prompt_ids(186, 144, image_token=32000)
    assert ids.shape == (186,) and ids[0] == 1 and (ids == 32000).sum() == 144 and (ids[1:145] == 32000).all()
    with pytest.raises(ValueError, match="cannot hold 144 visual tokens"):
        prompt_ids(100, 144, image_token=32000)


def test_total_steps_counts_what_the_run_does():
    settings = BenchSettings(
        repeats=3,
        warm_repeats=1,
        cases=CASES[:2],
        clients=(1, 2),
        throughput_repeats=2,
        media_repeats=2,
        video_frames=0,
    )
    # baseline: its model + one sample before each of the 3 + 1 rounds and one after; the stack: 1;
    # cases: 2 x (warm-up + 3 + 1); media: 2 (images only); floors: CLIP loaded + 3 rounds x 2;
    # streams: images cached + 2 engines x 3 counts; throughput: workers + 2 rounds x 2 x 2; outputs: 1.
    assert baseline_count(settings) == 5
    assert total_steps(settings) == 1 + 5 + 1 + 10 + 2 + 7 + 7 + 9 + 1
    # a new question about the last image of each text_recovery case, once per warm round
    recovery = dataclasses.replace(settings, cases=(Case("text_recovery", "text_recovery"),), warm_repeats=2)
    assert total_steps(recovery) == 1 + 6 + 1 + 6 + 2 + 2 + 7 + 7 + 9 + 1
