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

NAMES = ("none", "avgpool", "staged_pool layer=1")


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
        ),
        clients=(1, 2),
        requests_per_client=1,
        throughput_repeats=1,
        media_images=2,
        video_frames=3,
        media_budget=64,
        media_repeats=1,
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
    rows = {(r["name"], r["cache"]): r for r in data["rows"]}
    assert set(rows) == {(name, cache) for name in NAMES for cache in ("cold", "warm")}
    assert [rows[n, "cold"]["visual_tokens"] for n in NAMES] == [576, 144, 576]
    for name in NAMES:
        cold, warm = rows[name, "cold"], rows[name, "warm"]
        assert cold["cache_hits"] == 0 and warm["cache_hits"] == 1, name  # fresh images miss, a repeat hits
        assert warm["hit_ratio"] == pytest.approx(warm["encode_ms"] / cold["encode_ms"])
        assert cold["ttft_ratio"] == pytest.approx(cold["ttft_s"] / baseline["ttft_s"])
        assert 0 < cold["ttft_s"] <= cold["e2e_s"] and cold["peak_rss_bytes"] > baseline["peak_rss_bytes"] / 4

    # The KV bytes computed for the stack agree with what Hugging Face's cache held for the same prompt,
    # and pooling 576 tokens 4:1 from layer 1 leaves layer 1 holding 432 fewer.
    kv = KVShape.of_pack(tiny_pack.llava_dir, dtype_bytes=4)
    none, pooled = rows["none", "cold"], rows["staged_pool layer=1", "cold"]
    per_token = kv.layers * kv.per_token_layer
    assert (
        none["kv_bytes"]
        == baseline["kv_bytes"] + (none["completion_tokens"] - baseline["completion_tokens"]) * per_token
    )
    assert pooled["kv_bytes"] == none["kv_bytes"] + (
        pooled["completion_tokens"] - none["completion_tokens"]
    ) * per_token - (432 * kv.per_token_layer)

    images, video = data["media"]
    assert (images["items"], images["kept"], images["tokens_before"], images["budget"]) == (2, 2, 2 * 576, 64)
    assert 0 < images["visual_tokens"] <= 64
    assert (video["items"], video["tokens_before"]) == (3, 3 * 576) and 0 < video["visual_tokens"] <= 64

    points = {(p["clients"], p["max_batch"]): p for p in data["throughput"]}
    assert set(points) == {(1, 1), (1, 8), (2, 1), (2, 8)}
    assert points[2, 1]["mean_batch"] == 1.0  # max_batch 1: one image per forward, whatever the load
    assert all(p["images"] == p["clients"] and p["images_per_s"] > 0 for p in points.values())

    targets = data["targets"]
    assert len(targets) == 5 and all(t["measured"] is not None and t["met"] in (True, False) for t in targets)
    assert "(8 clients not measured in this run)" in targets[-1]["detail"]

    png = Image.open(paths["png"])
    assert png.format == "PNG" and png.size == (960, 600)
    table = paths["table"].read_text()
    assert all(name in table for name in ("baseline (HF)", *NAMES, "2 images (avgpool)", "3-frame video (avgpool)"))
