"""The bench's pure parts on fabricated measurements: medians, ratios, targets, table, JSON."""

from __future__ import annotations

import json

import pytest

from bench.results import (
    Report,
    Row,
    Sample,
    ThroughputPoint,
    aggregate,
    decode_rate,
    evaluate_targets,
    render_table,
    report_from_dict,
    report_to_dict,
    with_baseline,
    write_json,
)


def sample(
    ttft: float, e2e: float, tokens: int = 9, visual: int = 576, encode_ms: float = 0.0, hits: int = 0, peak: int = 0
) -> Sample:
    return Sample(
        ttft_s=ttft,
        e2e_s=e2e,
        completion_tokens=tokens,
        prompt_tokens=visual + 40,
        visual_tokens=visual,
        tokens_before=576,
        kv_bytes=(visual + 40) * 1000,
        encode_ms=encode_ms,
        cache_hits=hits,
        peak_rss_bytes=peak,
    )


BASELINE = aggregate("baseline (HF)", "", "-", [sample(2.0, 4.0), sample(4.0, 6.0), sample(3.0, 5.0)])


def rows(avgpool_cold_ttft: float = 0.6, hit_ms: float = 10.0) -> list[Row]:
    none_cold = aggregate("none", "none", "cold", [sample(3.1, 5.1, encode_ms=1000.0)], baseline=BASELINE)
    none_warm = aggregate(
        "none", "none", "warm", [sample(1.0, 3.0, encode_ms=hit_ms, hits=1)], baseline=BASELINE, cold=none_cold
    )
    pool_cold = aggregate(
        "avgpool", "avgpool", "cold", [sample(avgpool_cold_ttft, 2.0, visual=144, encode_ms=800.0)], baseline=BASELINE
    )
    pool_warm = aggregate(
        "avgpool",
        "avgpool",
        "warm",
        [sample(0.3, 1.5, visual=144, encode_ms=8.0, hits=1)],
        baseline=BASELINE,
        cold=pool_cold,
    )
    return [none_cold, none_warm, pool_cold, pool_warm]


def points(batched_8: float = 16.0) -> list[ThroughputPoint]:
    # images / seconds: unbatched 8 clients 8 images in 1 s; batched 8 images in 8/batched_8 s.
    return [
        ThroughputPoint(clients=1, max_batch=1, images=2, seconds=1.0),
        ThroughputPoint(clients=1, max_batch=8, images=2, seconds=1.0, mean_batch=1.0),
        ThroughputPoint(clients=8, max_batch=1, images=8, seconds=1.0),
        ThroughputPoint(clients=8, max_batch=8, images=8, seconds=8 / batched_8, mean_batch=6.5),
    ]


def test_aggregate_takes_medians_and_ratios():
    assert BASELINE.repeats == 3
    assert BASELINE.ttft_s == 3.0 and BASELINE.e2e_s == 5.0
    assert BASELINE.decode_tps == pytest.approx(4.0)  # 8 tokens after the first in 2 s, each sample
    assert BASELINE.ttft_ratio is None and BASELINE.hit_ratio is None

    row = aggregate("none", "none", "cold", [sample(1.0, 2.0, peak=7), sample(3.0, 4.0, peak=5)], baseline=BASELINE)
    assert row.ttft_s == 2.0  # the median of an even count is the mean of the middle two
    assert row.ttft_ratio == pytest.approx(2.0 / 3.0)
    assert row.e2e_ratio == pytest.approx(3.0 / 5.0)
    assert row.peak_rss_bytes == 7
    assert row.visual_tokens == 576 and row.kv_bytes == 616_000


def test_ratios_to_a_baseline_known_only_at_the_end():
    row = aggregate("none", "none", "cold", [sample(1.5, 2.5)])
    assert row.ttft_ratio is None
    again = with_baseline(row, BASELINE)
    assert again.ttft_ratio == pytest.approx(0.5) and again.e2e_ratio == pytest.approx(0.5)
    assert again.ttft_s == row.ttft_s and again.repeats == row.repeats


def test_warm_rows_carry_the_hit_to_miss_ratio():
    none_cold, none_warm, _, pool_warm = rows(hit_ms=20.0)
    assert none_warm.hit_ratio == pytest.approx(20.0 / 1000.0)
    assert pool_warm.hit_ratio == pytest.approx(8.0 / 800.0)
    assert none_warm.cache_hits == 1 and none_cold.cache_hits == 0


def test_decode_rate_needs_two_tokens_and_time():
    assert decode_rate(sample(1.0, 3.0, tokens=5)) == pytest.approx(2.0)
    assert decode_rate(sample(1.0, 3.0, tokens=1)) is None
    assert decode_rate(sample(1.0, 1.0, tokens=5)) is None
    assert aggregate("x", "x", "cold", [sample(1.0, 1.0, tokens=1)]).decode_tps == 0.0


def test_aggregate_refuses_no_samples():
    with pytest.raises(ValueError, match="no samples for 'none'"):
        aggregate("none", "none", "cold", [])


def test_targets_met():
    ttft_144, none, none_e2e, cache, batching = evaluate_targets(
        BASELINE, rows(avgpool_cold_ttft=0.6), points(batched_8=16.0)
    )
    assert ttft_144.measured == pytest.approx(0.2) and ttft_144.met is True
    assert "avgpool (cold cache) 0.60 s vs baseline 3.00 s" in ttft_144.detail
    assert "warm cache 0.30 s" in ttft_144.detail
    assert none.measured == pytest.approx(3.1 / 3.0) and none.met is True
    assert none_e2e.measured == pytest.approx(5.1 / 5.0) and none_e2e.met is True
    assert "decoding 4.0 vs 4.0 tokens/s" in none_e2e.detail
    assert cache.measured == pytest.approx(0.01) and cache.met is True  # the worst of none 0.010 and avgpool 0.010
    assert batching.measured == pytest.approx(2.0) and batching.met is True
    assert "6.5 images per forward" in batching.detail
    assert all(t.miss == "" for t in (ttft_144, none, none_e2e, cache, batching))


def test_targets_missed_say_by_how_much():
    ttft_144, _, _, cache, batching = evaluate_targets(
        BASELINE, rows(avgpool_cold_ttft=1.5, hit_ms=100.0), points(batched_8=12.0)
    )
    assert ttft_144.met is False and ttft_144.miss == "100% over the limit"  # 0.5x against 0.25x
    assert cache.met is False and cache.measured == pytest.approx(0.1)
    assert "worst none: hit 100 ms vs miss 1000 ms" in cache.detail
    assert batching.measured == pytest.approx(1.5) and batching.met is True  # the limit itself is met


def test_batching_target_just_short():
    *_, batching = evaluate_targets(BASELINE, rows(), points(batched_8=10.0))
    assert batching.measured == pytest.approx(1.25)
    assert batching.met is False and batching.miss == "17% short of the limit"


def test_targets_not_measured_and_the_client_count_fallback():
    targets = evaluate_targets(None, [], [])
    assert [t.met for t in targets] == [None, None, None, None, None]
    assert all(t.detail.startswith("not measured") for t in targets)
    two = [ThroughputPoint(2, 1, 2, 1.0), ThroughputPoint(2, 8, 2, 0.5)]
    *_, batching = evaluate_targets(BASELINE, rows(), two)
    assert batching.measured == pytest.approx(2.0)
    assert "(8 clients not measured in this run)" in batching.detail


def report() -> Report:
    media = aggregate("8 images (avgpool)", "avgpool", "cold", [sample(5.0, 6.0, visual=512)], budget=576)
    return Report(
        meta={
            "mode": "quick",
            "pack_id": "tiny-medium-x",
            "device": "cpu",
            "repeats": 2,
            "warm_repeats": 2,
            "max_new_tokens": 8,
        },
        baseline=BASELINE,
        rows=rows(),
        throughput=points(),
        media=[media],
    )


def test_table_shows_every_part():
    text = render_table(report())
    lines = text.splitlines()
    assert lines[0].startswith("squint bench (quick) on pack tiny-medium-x, device cpu")
    header = next(line for line in lines if line.startswith("run "))
    assert header.split()[:4] == ["run", "cache", "visual", "TTFT"]
    baseline_line = next(line for line in lines if line.startswith("baseline (HF)"))
    assert baseline_line.split()[2:6] == ["-", "576", "3.000", "-"]
    warm = [line for line in lines if line.startswith("avgpool") and " warm " in line]
    assert len(warm) == 1 and warm[0].split()[-1] == "0.010x"
    assert any(line.split()[:4] == ["8", "8.00", "16.00", "2.00x"] for line in lines)
    assert any(line.startswith("8 images (avgpool)") and "576 -> 512" in line for line in lines)
    assert "micro-batched vision throughput at 8 clients >= 1.5x unbatched" in text
    assert text.count(" met") >= 5


def test_table_marks_a_missed_target():
    r = report()
    r.rows = rows(avgpool_cold_ttft=1.5)
    assert "MISSED (100% over the limit)" in render_table(r)


def test_json_round_trip(tmp_path):
    path = tmp_path / "bench.json"
    original = report()
    write_json(original, path)
    data = json.loads(path.read_text())
    assert data["format"] == "squint-bench/1"
    assert data["baseline"]["ttft_s"] == 3.0
    assert [r["cache"] for r in data["rows"]] == ["cold", "warm", "cold", "warm"]
    assert data["throughput"][3]["images_per_s"] == pytest.approx(16.0) and data["throughput"][3]["batching"] is True
    assert [t["met"] for t in data["targets"]] == [True, True, True, True, True]
    again = report_from_dict(data)
    assert again.rows == original.rows and again.baseline == original.baseline and again.media == original.media
    assert again.throughput == original.throughput
    assert report_to_dict(again) == data


def test_json_refuses_other_files():
    with pytest.raises(ValueError, match="not a squint bench result"):
        report_from_dict({"format": "something-else"})
