"""The bench's pure parts on fabricated measurements: medians, ratios, targets, table, JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench.results import (
    Floors,
    PrefillFloor,
    Report,
    Row,
    Sample,
    StreamPoint,
    ThroughputPoint,
    aggregate,
    decode_rate,
    evaluate_targets,
    percentile,
    render_table,
    report_from_dict,
    report_to_dict,
    stream_point,
    with_baseline,
    with_floors,
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


# 9 tokens: 8 after the first, decoded in e2e - ttft seconds. The baseline decodes 4 tokens/s.
BASELINE = aggregate("baseline (HF)", "", "-", [sample(2.0, 4.0), sample(4.0, 6.0), sample(3.0, 5.0)])
FLOORS = Floors(
    clip_s=0.4,
    clip_repeats=3,
    clip_how="in the bench's process",
    prefill=(PrefillFloor("vllm", 616, 576, 1.0, 3), PrefillFloor("vllm", 184, 144, 0.2, 3)),
)


def rows(
    avgpool_cold_ttft: float = 0.6,
    hit_ms: float = 10.0,
    none_ttft: float = 3.1,
    none_e2e: float = 4.1,
    question_ms: float = 50.0,
) -> list[Row]:
    """Fabricated rows of both engines: none (vLLM) decodes 8 tokens in 1 s, 2x the baseline."""
    none_cold = aggregate(
        "none", "none", "cold", [sample(none_ttft, none_e2e, encode_ms=1000.0)], baseline=BASELINE, engine="vllm"
    )
    none_warm = aggregate(
        "none",
        "none",
        "warm",
        [sample(1.0, 3.0, encode_ms=hit_ms, hits=1)],
        baseline=BASELINE,
        cold=none_cold,
        engine="vllm",
    )
    pool_cold = aggregate(
        "avgpool",
        "avgpool",
        "cold",
        [sample(avgpool_cold_ttft, 2.0, visual=144, encode_ms=800.0)],
        baseline=BASELINE,
        engine="vllm",
    )
    pool_warm = aggregate(
        "avgpool",
        "avgpool",
        "warm",
        [sample(0.3, 1.5, visual=144, encode_ms=8.0, hits=1)],
        baseline=BASELINE,
        cold=pool_cold,
        engine="vllm",
    )
    recovery_cold = aggregate(
        "text_recovery", "text_recovery", "cold", [sample(0.7, 2.0, visual=98, encode_ms=1000.0)], engine="vllm"
    )
    recovery_question = aggregate(
        "text_recovery",
        "text_recovery",
        "new q",
        [sample(0.35, 1.6, visual=98, encode_ms=question_ms, hits=1)],
        cold=recovery_cold,
        engine="vllm",
    )
    # The staged engine's `none`, slower: it must never be taken for the vLLM one.
    staged = aggregate(
        "none", "none", "cold", [sample(9.0, 20.0, encode_ms=1000.0)], baseline=BASELINE, engine="staged"
    )
    return with_floors([none_cold, none_warm, pool_cold, pool_warm, recovery_cold, recovery_question, staged], FLOORS)


def points(batched_8: float = 16.0) -> list[ThroughputPoint]:
    # images / seconds: unbatched 8 clients 8 images in 1 s; batched 8 images in 8/batched_8 s.
    return [
        ThroughputPoint(clients=1, max_batch=1, images=2, seconds=1.0),
        ThroughputPoint(clients=1, max_batch=8, images=2, seconds=1.0, mean_batch=1.0),
        ThroughputPoint(clients=8, max_batch=1, images=8, seconds=1.0),
        ThroughputPoint(clients=8, max_batch=8, images=8, seconds=8 / batched_8, mean_batch=6.5),
    ]


def streams(sixteen_tps: float = 100.0) -> list[StreamPoint]:
    """vLLM: one stream 20 tokens/s; 16 streams ``sixteen_tps``; the staged engine's one stream."""
    return [
        StreamPoint("vllm", 1, "avgpool", requests=2, tokens=40, seconds=2.0, ttft_p50_s=0.2, ttft_p99_s=0.3),
        StreamPoint("vllm", 4, "avgpool", 8, 160, 4.0, 0.3, 0.5),
        StreamPoint("vllm", 16, "avgpool", 32, 640, 640 / sixteen_tps, 0.6, 1.2),
        StreamPoint("staged", 1, "avgpool", 2, 40, 4.0, 0.4, 0.5),
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
    none_cold, none_warm, _, pool_warm, *_ = rows(hit_ms=20.0)
    assert none_warm.hit_ratio == pytest.approx(20.0 / 1000.0)
    assert pool_warm.hit_ratio == pytest.approx(8.0 / 800.0)
    assert none_warm.cache_hits == 1 and none_cold.cache_hits == 0


def test_decode_rate_needs_two_tokens_and_time():
    assert decode_rate(sample(1.0, 3.0, tokens=5)) == pytest.approx(2.0)
    # tokens that came in the first message arrived at TTFT: they are not decoded after it
    assert decode_rate(dataclasses.replace(sample(1.0, 3.0, tokens=5), first_tokens=3)) == pytest.approx(1.0)
    assert decode_rate(dataclasses.replace(sample(1.0, 3.0, tokens=5), first_tokens=5)) is None
    assert decode_rate(sample(1.0, 3.0, tokens=1)) is None
    assert decode_rate(sample(1.0, 1.0, tokens=5)) is None
    assert aggregate("x", "x", "cold", [sample(1.0, 1.0, tokens=1)]).decode_tps == 0.0


def test_aggregate_refuses_no_samples():
    with pytest.raises(ValueError, match="no samples for 'none'"):
        aggregate("none", "none", "cold", [])


def test_rows_carry_their_engine_prompt_and_floor():
    none, _, pool, pool_warm, _, question, staged = rows()
    assert (none.engine, staged.engine) == ("vllm", "staged")
    assert none.prompt_tokens == 616 and pool.prompt_tokens == 184
    assert none.floor_s == pytest.approx(1.4) and none.floor_ratio == pytest.approx(3.1 / 1.4)
    assert pool.floor_s == pytest.approx(0.6) and pool.floor_ratio == pytest.approx(1.0)
    # warm rows have no floor; nor has a cold row whose (engine, prompt) prefill was not measured
    assert pool_warm.floor_s is None and staged.floor_s is None and staged.floor_ratio is None
    # nor one pooled inside the LLM, though a plain prompt of its length was measured
    pooled = aggregate("staged_pool layer=2", "staged_pool", "cold", [sample(1.0, 2.0)], engine="vllm")
    assert with_floors([pooled], FLOORS)[0].floor_s == pytest.approx(1.4)
    assert with_floors([pooled], FLOORS, {"staged_pool layer=2"})[0].floor_s is None
    assert question.cache == "new q" and question.hit_ratio == pytest.approx(0.05)
    assert staged.label == "none [staged]" and none.label == "none"


def test_percentiles_and_stream_points():
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)
    samples = [sample(0.1 * i, 0.1 * i + 1.0, tokens=9) for i in range(1, 5)]
    point = stream_point("vllm", 4, "avgpool", samples, seconds=2.0)
    assert (point.requests, point.tokens) == (4, 36)
    assert point.requests_per_s == pytest.approx(2.0) and point.tokens_per_s == pytest.approx(18.0)
    assert point.ttft_p50_s == pytest.approx(0.25) and point.ttft_p99_s == pytest.approx(0.397)
    assert point.decode_tps == pytest.approx(8.0)


def test_targets_met():
    targets = evaluate_targets(BASELINE, rows(none_ttft=3.1, none_e2e=4.1), streams(sixteen_tps=100.0))
    decode, none_ttft, none_e2e, avgpool_e2e, warm_144, floor, question, sixteen = targets
    assert decode.measured == pytest.approx(2.0) and decode.met is True  # 8 tokens/s against 4
    assert "none [vllm] decodes 8.0 tokens/s vs baseline 4.0" in decode.detail
    assert none_ttft.measured == pytest.approx(3.1 / 3.0) and none_ttft.met is True
    assert none_e2e.measured == pytest.approx(4.1 / 5.0) and none_e2e.met is True
    assert "decoding 8.0 vs 4.0 tokens/s" in none_e2e.detail
    assert avgpool_e2e.measured == pytest.approx(2.0 / 5.0) and avgpool_e2e.met is True
    assert warm_144.measured == pytest.approx(0.1) and warm_144.met is True
    assert floor.measured == pytest.approx(1.0) and floor.met is True
    assert "TTFT 0.600 s vs floor 0.600 s" in floor.detail
    assert question.measured == pytest.approx(0.05) and question.met is True
    assert sixteen.measured == pytest.approx(5.0) and sixteen.met is True
    assert all(t.miss == "" for t in targets)


def test_targets_missed_say_by_how_much():
    targets = evaluate_targets(
        BASELINE, rows(avgpool_cold_ttft=1.2, none_ttft=3.3, none_e2e=6.0, question_ms=200.0), streams(60.0)
    )
    decode, none_ttft, none_e2e, _, _, floor, question, sixteen = targets
    assert decode.met is False and decode.measured == pytest.approx((8 / 2.7) / 4.0)
    assert none_ttft.met is False and none_ttft.miss == "5% over the limit"  # 1.1x against 1.05x
    assert none_e2e.met is False and none_e2e.miss == "33% over the limit"  # 1.2x against 0.9x
    assert floor.met is False and floor.measured == pytest.approx(2.0)
    assert question.met is False and question.miss == "100% over the limit"
    assert sixteen.met is False and sixteen.miss == "25% short of the limit"  # 3x against 4x


def test_targets_read_the_vllm_rows_only():
    only_staged = [r for r in rows() if r.engine == "staged"]
    decode, none_ttft, none_e2e, *_ = evaluate_targets(BASELINE, only_staged, [])
    assert [decode.met, none_ttft.met, none_e2e.met] == [None, None, None]


def test_targets_not_measured_and_fewer_streams():
    targets = evaluate_targets(None, [], [])
    assert len(targets) == 8 and [t.met for t in targets] == [None] * 8
    assert all(t.detail.startswith("not measured") for t in targets)
    four = [p for p in streams() if p.streams <= 4]
    *_, sixteen = evaluate_targets(BASELINE, rows(), four)
    assert sixteen.measured == pytest.approx(2.0)  # 40 tokens/s against 20
    assert "(4 streams at most in this run)" in sixteen.detail


def report() -> Report:
    media = aggregate(
        "8 images (avgpool)", "avgpool", "cold", [sample(5.0, 6.0, visual=512)], budget=576, engine="vllm"
    )
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
        streams=streams(),
        floors=FLOORS,
    )


def test_table_shows_every_part():
    text = render_table(report())
    lines = text.splitlines()
    assert lines[0].startswith("squint bench (quick) on pack tiny-medium-x, device cpu")
    header = next(line for line in lines if line.startswith("run "))
    assert header.split()[:5] == ["run", "engine", "cache", "visual", "TTFT"]
    assert header.split()[-4:] == ["floor", "s", "x", "floor"]
    baseline_line = next(line for line in lines if line.startswith("baseline (HF)"))
    assert baseline_line.split()[2:7] == ["-", "-", "576", "3.000", "-"]
    warm = [line for line in lines if line.startswith("avgpool") and " warm " in line]
    assert len(warm) == 1 and warm[0].split()[-3:] == ["0.010x", "-", "-"]
    cold = next(line for line in lines if line.startswith("avgpool") and " cold " in line)
    assert cold.split()[1] == "vllm" and cold.split()[-2:] == ["0.600", "1.00x"]
    assert any(line.split()[:3] == ["none", "staged", "cold"] for line in lines)
    assert any(line.split()[:3] == ["text_recovery", "vllm", "new"] for line in lines)
    # floors: CLIP alone, and each prefill with its floor
    assert "CLIP alone 400 ms (median of 3; in the bench's process)" in text
    assert any(line.split() == ["vllm", "184", "144", "0.200", "0.600"] for line in lines)
    # streams: engine, streams, requests, req/s, tok/s, x 1 stream, TTFT p50, p99
    assert any(line.split()[:8] == ["vllm", "16", "32", "5.00", "100.0", "5.00x", "0.600", "1.200"] for line in lines)
    assert any(line.split()[:6] == ["staged", "1", "2", "0.50", "10.0", "1.00x"] for line in lines)
    # vision micro-batching stays, labelled
    assert "Vision worker micro-batching (informational, no target" in text
    assert any(line.split()[:4] == ["8", "8.00", "16.00", "2.00x"] for line in lines)
    assert "micro-batched" not in text.split("Targets")[1]
    assert any(line.startswith("8 images (avgpool)") and "576 -> 512" in line for line in lines)
    assert "16 streams >= 4x one stream's tokens/s (vLLM)" in text
    assert text.count(" met") >= 8


def test_table_marks_a_missed_target():
    r = report()
    r.rows = rows(avgpool_cold_ttft=1.2)
    assert "MISSED (82% over the limit)" in render_table(r)  # 1.2 s against a 0.6 s floor: 2.0x over 1.1x


def test_json_round_trip(tmp_path):
    path = tmp_path / "bench.json"
    original = report()
    write_json(original, path)
    data = json.loads(path.read_text())
    assert data["format"] == "squint-bench/2"
    assert data["baseline"]["ttft_s"] == 3.0
    assert [(r["engine"], r["cache"]) for r in data["rows"]] == [
        ("vllm", "cold"),
        ("vllm", "warm"),
        ("vllm", "cold"),
        ("vllm", "warm"),
        ("vllm", "cold"),
        ("vllm", "new q"),
        ("staged", "cold"),
    ]
    assert data["rows"][2]["floor_ratio"] == pytest.approx(1.0)
    assert data["throughput"][3]["images_per_s"] == pytest.approx(16.0) and data["throughput"][3]["batching"] is True
    assert data["streams"][2]["tokens_per_s"] == pytest.approx(100.0) and data["streams"][2]["engine"] == "vllm"
    assert data["floors"]["clip_s"] == 0.4 and data["floors"]["prefill"][1]["visual_tokens"] == 144
    assert len(data["targets"]) == 8 and all(t["met"] is True for t in data["targets"])
    again = report_from_dict(data)
    assert again.rows == original.rows and again.baseline == original.baseline and again.media == original.media
    assert again.throughput == original.throughput and again.streams == original.streams
    assert again.floors == original.floors
    assert report_to_dict(again) == data


def test_json_refuses_other_files():
    with pytest.raises(ValueError, match="not a squint bench result"):
        report_from_dict({"format": "something-else"})
