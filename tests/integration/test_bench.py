"""``squint bench``'s whole code path on the tiny pack, with the smallest settings: the real
baseline, the real stack, the real vision workers; checked for what was measured, never for time."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from bench.kv import KVShape
from bench.progress import Progress
from bench.run import run_bench, total_steps
from bench.settings import BenchSettings, Case
from bench.suite import write_outputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# (name, engine) of every case: the two engines' `none`, and pooling inside the LLM on the staged one.
KEYS = (("none", "vllm"), ("avgpool", "vllm"), ("staged_pool layer=1", "staged"), ("none", "staged"))


def test_bench_end_to_end_on_the_tiny_pack(tiny_pack, tmp_path):
    settings = BenchSettings(
        mode="smoke",
        repeats=1,
        warm_repeats=1,
        max_new_tokens=2,
        # The tiny LLM has two layers: pool inside it after layer 1.
        cases=(
            Case("none", "none"),
            Case("avgpool", "avgpool"),
            Case("staged_pool layer=1", "staged_pool", {"layer": 1}),
            Case("text_recovery", "text_recovery"),
            Case("none", "none", engine="staged"),
        ),
        clients=(1, 2),
        requests_per_client=1,
        throughput_repeats=1,
        media_images=2,
        video_frames=3,
        media_budget=64,
        media_repeats=1,
        streams=(1, 2),
        stream_requests=1,
        stream_engines=("vllm", "staged"),
        llm_max_batch=4,
        floor_repeats=1,
    )
    bar = io.StringIO()
    progress = Progress(total_steps(settings), stream=bar)
    report = run_bench(tiny_pack.root, tmp_path, settings, progress=progress)
    paths = write_outputs(report, tmp_path)
    assert progress.done == total_steps(settings) - 1  # all but "done", which `squint bench` counts last
    assert "baseline 3/3" in bar.getvalue()  # before the cold round, the warm round, and after

    data = json.loads(paths["json"].read_text())
    assert data["meta"]["failures"] == []
    assert data["meta"]["cache"].startswith("Redis at")
    baseline = data["baseline"]
    assert baseline["visual_tokens"] == 576 and baseline["repeats"] == 3
    assert baseline["peak_rss_bytes"] > 0
    assert data["meta"]["engines"] == {"vllm": "squint_llm", "staged": "squint_llm_staged"}
    rows = {(r["name"], r["engine"], r["cache"]): r for r in data["rows"]}
    expected = {(*key, cache) for key in (*KEYS, ("text_recovery", "vllm")) for cache in ("cold", "warm")}
    assert set(rows) == expected | {("text_recovery", "vllm", "new q")}
    assert [rows[(*key, "cold")]["visual_tokens"] for key in KEYS] == [576, 144, 576, 576]
    for key in KEYS:
        cold, warm = rows[(*key, "cold")], rows[(*key, "warm")]
        assert cold["cache_hits"] == 0 and warm["cache_hits"] == 1, key  # fresh images miss, a repeat hits
        assert warm["hit_ratio"] == pytest.approx(warm["encode_ms"] / cold["encode_ms"])
        assert cold["ttft_ratio"] == pytest.approx(cold["ttft_s"] / baseline["ttft_s"])
        assert 0 < cold["ttft_s"] <= cold["e2e_s"] and cold["peak_rss_bytes"] > baseline["peak_rss_bytes"] / 4
    question = rows["text_recovery", "vllm", "new q"]
    recovery = rows["text_recovery", "vllm", "cold"]
    assert question["hit_ratio"] == pytest.approx(question["encode_ms"] / recovery["encode_ms"])

    # The floors: CLIP alone, and the prefill of every cold row's prompt but the one pooled inside the LLM.
    floors = data["floors"]
    assert floors["clip_s"] > 0 and floors["clip_repeats"] == 1
    prefills = {(f["engine"], f["prompt_tokens"], f["visual_tokens"]): f for f in floors["prefill"]}
    for key in (("none", "vllm"), ("avgpool", "vllm"), ("none", "staged"), ("text_recovery", "vllm")):
        cold = rows[(*key, "cold")]
        prefill = prefills[cold["engine"], cold["prompt_tokens"], cold["visual_tokens"]]
        assert prefill["seconds"] > 0 and prefill["repeats"] == 1, key
        assert cold["floor_s"] == pytest.approx(floors["clip_s"] + prefill["seconds"])
        assert cold["floor_ratio"] == pytest.approx(cold["ttft_s"] / cold["floor_s"])
    assert rows["staged_pool layer=1", "staged", "cold"]["floor_s"] is None
    assert {engine for engine, _, _ in prefills} == {"vllm", "staged"}  # the staged `none`, not the pooled row

    # The streams: every engine at every count, every request answered.
    streams = {(p["engine"], p["streams"]): p for p in data["streams"]}
    assert set(streams) == {("vllm", 1), ("vllm", 2), ("staged", 1), ("staged", 2)}
    for (_, count), point in streams.items():
        assert point["requests"] == count and 0 < point["tokens"] <= count * settings.max_new_tokens
        assert 0 < point["ttft_p50_s"] <= point["ttft_p99_s"] <= point["seconds"]

    # The KV bytes computed for the stack agree with what Hugging Face's cache held for the same prompt,
    # and pooling 576 tokens 4:1 from layer 1 leaves layer 1 holding 432 fewer.
    kv = KVShape.of_pack(tiny_pack.llava_dir, dtype_bytes=4)
    none, pooled = rows["none", "vllm", "cold"], rows["staged_pool layer=1", "staged", "cold"]
    per_token = kv.layers * kv.per_token_layer
    for row in (none, rows["none", "staged", "cold"]):
        assert (
            row["kv_bytes"]
            == baseline["kv_bytes"] + (row["completion_tokens"] - baseline["completion_tokens"]) * per_token
        )
    assert pooled["kv_bytes"] == none["kv_bytes"] + (
        pooled["completion_tokens"] - none["completion_tokens"]
    ) * per_token - (432 * kv.per_token_layer)
    # vLLM's gauge (squint_llm's sample only) counts the tokens in flight at the per-token bytes: at
    # most the prompt and every generated token, one more than the cache holds at the end.
    assert none["kv_gauge_bytes"] % per_token == 0
    assert none["kv_gauge_bytes"] <= none["kv_bytes"] + per_token

    images, video = data["media"]
    assert (images["items"], images["kept"], images["tokens_before"], images["budget"]) == (2, 2, 2 * 576, 64)
    assert 0 < images["visual_tokens"] <= 64
    assert (video["items"], video["tokens_before"]) == (3, 3 * 576) and 0 < video["visual_tokens"] <= 64

    points = {(p["clients"], p["max_batch"]): p for p in data["throughput"]}
    assert set(points) == {(1, 1), (1, 8), (2, 1), (2, 8)}
    assert points[2, 1]["mean_batch"] == 1.0  # max_batch 1: one image per forward, whatever the load
    assert all(p["images"] == p["clients"] and p["images_per_s"] > 0 for p in points.values())

    targets = data["targets"]
    assert len(targets) == 8 and all(t["measured"] is not None and t["met"] in (True, False) for t in targets)
    assert "(2 streams at most in this run)" in targets[-1]["detail"]

    png = Image.open(paths["png"])
    assert png.format == "PNG" and png.size == (960, 600)
    table = paths["table"].read_text()
    names = ("baseline (HF)", "staged_pool layer=1", "text_recovery", "2 images (avgpool)", "3-frame video (avgpool)")
    assert all(name in table for name in names)
    assert "LLM throughput: concurrent streams" in table and "Floors (no compressor removes them)" in table
