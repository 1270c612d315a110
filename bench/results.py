"""What ``squint bench`` measured: samples, their medians, the targets, the table and the JSON.

Pure: nothing here starts a server or reads a clock, so the aggregation and the writers are
tested on fabricated measurements (tests/unit/bench).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON_FORMAT = "squint-bench/1"
MB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """One timed request, as the client saw it (times in seconds) plus what the reply said."""

    ttft_s: float  # from sending the request to the first generated token
    e2e_s: float  # from sending the request to the last message
    completion_tokens: int
    prompt_tokens: int
    visual_tokens: int  # spliced into the prompt, summed over items
    tokens_before: int = 0  # before compression, summed over items
    kv_bytes: int = 0  # K and V held for the request at its end (see bench.kv.kv_bytes)
    kv_gauge_bytes: int = 0  # peak of the LLM worker's squint_llm_kv_cache_bytes while it ran; 0: not seen
    encode_ms: float = 0.0  # the orchestrator's receipt until every visual token was in hand
    worker_encode_ms: float = 0.0  # time the vision worker spent on the items, summed
    cache_hits: int = 0  # items served wholly from the cache
    items: int = 1  # images and frames in the request
    kept: int = 1  # items that reached the prompt (the rest were dropped as duplicates)
    peak_rss_bytes: int = 0  # peak resident memory of the processes that served it, summed


@dataclass(frozen=True)
class Row:
    """The medians of one configuration's samples, and its ratios to the baseline."""

    name: str  # "baseline (HF)", "none", "staged_pool layer=2", "8 images", ...
    compressor: str  # "" for the baseline
    cache: str  # "-" (no cache: the baseline), "cold" (every item a miss) or "warm" (every item a hit)
    repeats: int
    visual_tokens: int
    tokens_before: int
    ttft_s: float
    e2e_s: float
    decode_tps: float  # generated tokens after the first, per second of decoding
    completion_tokens: int
    kv_bytes: int
    kv_gauge_bytes: int
    peak_rss_bytes: int  # peak resident memory of the processes that served it, summed
    encode_ms: float
    worker_encode_ms: float
    cache_hits: int
    items: int = 1
    kept: int = 1
    budget: int = 0
    ttft_ratio: float | None = None  # ttft_s / the baseline's
    e2e_ratio: float | None = None  # e2e_s / the baseline's
    hit_ratio: float | None = None  # warm rows: encode_ms / the same compressor's cold encode_ms


@dataclass(frozen=True)
class ThroughputPoint:
    """Images per second through the vision worker's Analyze at one client count."""

    clients: int
    max_batch: int  # the worker's SQUINT_VISION_BATCHING_MAX_BATCH; 1 = no micro-batching
    images: int  # images sent per repeat, over all clients
    seconds: float  # median wall time of the repeats
    repeats: int = 1
    mean_batch: float = 0.0  # images per CLIP forward, from the worker's squint_vision_batch_size; 0: unknown

    @property
    def batching(self) -> bool:
        return self.max_batch > 1

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Target:
    """One of the issue's targets and whether this run met it."""

    name: str
    limit: float
    comparison: str  # "<=" or ">="
    measured: float | None  # None: not measured in this run
    detail: str

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.limit if self.comparison == "<=" else self.measured >= self.limit

    @property
    def miss(self) -> str:
        """How far off a missed target is, in words ("" when met or not measured)."""
        if self.met is not False or self.measured is None:
            return ""
        if self.comparison == "<=":
            return f"{self.measured / self.limit - 1:.0%} over the limit"
        return f"{1 - self.measured / self.limit:.0%} short of the limit"


@dataclass
class Report:
    """Everything one ``squint bench`` run measured."""

    meta: dict[str, Any]
    baseline: Row | None
    rows: list[Row] = field(default_factory=list)  # the stack: cold and warm per compressor
    throughput: list[ThroughputPoint] = field(default_factory=list)
    media: list[Row] = field(default_factory=list)

    @property
    def targets(self) -> list[Target]:
        return evaluate_targets(self.baseline, self.rows, self.throughput)


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else 0.0


def decode_rate(sample: Sample) -> float | None:
    """Tokens per second after the first token; None when there is nothing to divide."""
    decoding = sample.e2e_s - sample.ttft_s
    if sample.completion_tokens < 2 or decoding <= 0:
        return None
    return (sample.completion_tokens - 1) / decoding


def aggregate(
    name: str,
    compressor: str,
    cache: str,
    samples: Sequence[Sample],
    *,
    baseline: Row | None = None,
    cold: Row | None = None,
    budget: int = 0,
) -> Row:
    """The medians of ``samples``, with ratios to ``baseline`` and (warm rows) to ``cold``'s encode."""
    if not samples:
        raise ValueError(f"no samples for {name!r} ({cache}); every configuration needs at least one")
    rates = [r for s in samples if (r := decode_rate(s)) is not None]
    ttft = _median(s.ttft_s for s in samples)
    e2e = _median(s.e2e_s for s in samples)
    encode_ms = _median(s.encode_ms for s in samples)

    def ratio(mine: float, theirs: float | None) -> float | None:
        return mine / theirs if theirs else None

    return Row(
        name=name,
        compressor=compressor,
        cache=cache,
        repeats=len(samples),
        visual_tokens=round(_median(s.visual_tokens for s in samples)),
        tokens_before=round(_median(s.tokens_before for s in samples)),
        ttft_s=ttft,
        e2e_s=e2e,
        decode_tps=_median(rates),
        completion_tokens=round(_median(s.completion_tokens for s in samples)),
        kv_bytes=round(_median(s.kv_bytes for s in samples)),
        kv_gauge_bytes=max(s.kv_gauge_bytes for s in samples),
        peak_rss_bytes=max(s.peak_rss_bytes for s in samples),
        encode_ms=encode_ms,
        worker_encode_ms=_median(s.worker_encode_ms for s in samples),
        cache_hits=min(s.cache_hits for s in samples),
        items=max(s.items for s in samples),
        kept=round(_median(s.kept for s in samples)),
        budget=budget,
        ttft_ratio=ratio(ttft, baseline.ttft_s if baseline else None),
        e2e_ratio=ratio(e2e, baseline.e2e_s if baseline else None),
        hit_ratio=ratio(encode_ms, cold.encode_ms if cold else None),
    )


def with_baseline(row: Row, baseline: Row) -> Row:
    """``row`` with its TTFT and end-to-end ratios to ``baseline``."""
    return dataclasses.replace(
        row,
        ttft_ratio=row.ttft_s / baseline.ttft_s if baseline.ttft_s else None,
        e2e_ratio=row.e2e_s / baseline.e2e_s if baseline.e2e_s else None,
    )


# --------------------------------------------------------------------------- targets

TTFT_144_LIMIT = 0.25
NONE_LIMIT = 1.10
CACHE_HIT_LIMIT = 0.05
BATCHING_LIMIT = 1.5


def _find(rows: Sequence[Row], cache: str, name: str | None = None, tokens: int | None = None) -> Row | None:
    for row in rows:
        if (
            row.cache == cache
            and (name is None or row.name == name)
            and (tokens is None or row.visual_tokens == tokens)
        ):
            return row
    return None


def evaluate_targets(baseline: Row | None, rows: Sequence[Row], throughput: Sequence[ThroughputPoint]) -> list[Target]:
    """The issue's targets (the `none` one for TTFT and end to end), each against this run's own numbers."""
    targets = []

    # 1. TTFT with 144 visual tokens (avgpool stride 2 when measured, else any 144-token row).
    name = "TTFT at 144 visual tokens <= 0.25x the baseline's at 576"
    row = _find(rows, "cold", "avgpool", 144) or _find(rows, "cold", tokens=144)
    if baseline is None or row is None:
        targets.append(Target(name, TTFT_144_LIMIT, "<=", None, "not measured: no baseline or no 144-token row"))
    else:
        warm = _find(rows, "warm", row.name)
        detail = f"{row.name} (cold cache) {row.ttft_s:.2f} s vs baseline {baseline.ttft_s:.2f} s"
        if warm is not None:
            detail += f"; with a warm cache {warm.ttft_s:.2f} s = {warm.ttft_s / baseline.ttft_s:.2f}x"
        targets.append(Target(name, TTFT_144_LIMIT, "<=", row.ttft_s / baseline.ttft_s, detail))

    # 2. The stack with every token (compressor none) against the in-process baseline: the
    # first token, and the whole answer.
    row = _find(rows, "cold", "none")
    for what, mine, theirs in (("TTFT", "ttft_s", "ttft_s"), ("end to end", "e2e_s", "e2e_s")):
        name = f"Squint with none: {what} <= 1.10x the baseline's"
        if baseline is None or row is None:
            targets.append(Target(name, NONE_LIMIT, "<=", None, "not measured: no baseline or no `none` row"))
            continue
        a, b = getattr(row, mine), getattr(baseline, theirs)
        detail = f"{what} {a:.2f} s vs {b:.2f} s"
        if what == "end to end":
            detail += (
                f"; {row.completion_tokens} vs {baseline.completion_tokens} tokens, decoding "
                f"{row.decode_tps:.1f} vs {baseline.decode_tps:.1f} tokens/s"
            )
        targets.append(Target(name, NONE_LIMIT, "<=", a / b if b else None, detail))

    # 3. A cache hit's encode against a miss, for every compressor measured both ways: the worst.
    name = "cache-hit encode <= 0.05x a miss"
    pairs = [
        (w.name, w.hit_ratio, w.encode_ms, c.encode_ms)
        for w in rows
        if w.cache == "warm" and w.hit_ratio is not None
        for c in [_find(rows, "cold", w.name)]
        if c is not None
    ]
    if not pairs:
        targets.append(Target(name, CACHE_HIT_LIMIT, "<=", None, "not measured: no warm rows"))
    else:
        worst = max(pairs, key=lambda p: p[1])
        best = min(pairs, key=lambda p: p[1])
        detail = (
            f"worst {worst[0]}: hit {worst[2]:.0f} ms vs miss {worst[3]:.0f} ms; "
            f"best {best[0]}: {best[1]:.3f}x ({len(pairs)} compressors)"
        )
        targets.append(Target(name, CACHE_HIT_LIMIT, "<=", worst[1], detail))

    # 4. Micro-batched vision throughput at 8 clients (or the most measured) against unbatched.
    name = "micro-batched vision throughput at 8 clients >= 1.5x unbatched"
    by_clients: dict[int, dict[bool, ThroughputPoint]] = {}
    for point in throughput:
        by_clients.setdefault(point.clients, {})[point.batching] = point
    both = sorted(c for c, modes in by_clients.items() if len(modes) == 2)
    if not both:
        targets.append(Target(name, BATCHING_LIMIT, ">=", None, "not measured: no client count with both modes"))
    else:
        clients = 8 if 8 in both else both[-1]
        on, off = by_clients[clients][True], by_clients[clients][False]
        detail = (
            f"{clients} clients: {on.images_per_s:.2f} images/s batched (max_batch {on.max_batch}, "
            f"{on.mean_batch:.1f} images per forward) vs {off.images_per_s:.2f} unbatched"
        )
        if clients != 8:
            detail += " (8 clients not measured in this run)"
        measured = on.images_per_s / off.images_per_s if off.images_per_s else None
        targets.append(Target(name, BATCHING_LIMIT, ">=", measured, detail))
    return targets


# --------------------------------------------------------------------------- JSON


def report_to_dict(report: Report) -> dict[str, Any]:
    """The report as plain JSON types, derived values included."""

    def point(p: ThroughputPoint) -> dict[str, Any]:
        return {**dataclasses.asdict(p), "batching": p.batching, "images_per_s": p.images_per_s}

    def target(t: Target) -> dict[str, Any]:
        return {**dataclasses.asdict(t), "met": t.met, "miss": t.miss}

    return {
        "format": JSON_FORMAT,
        "meta": report.meta,
        "baseline": dataclasses.asdict(report.baseline) if report.baseline else None,
        "rows": [dataclasses.asdict(r) for r in report.rows],
        "throughput": [point(p) for p in report.throughput],
        "media": [dataclasses.asdict(r) for r in report.media],
        "targets": [target(t) for t in report.targets],
    }


def report_from_dict(data: dict[str, Any]) -> Report:
    """The inverse of :func:`report_to_dict` (derived values are recomputed)."""
    if data.get("format") != JSON_FORMAT:
        raise ValueError(f"not a squint bench result: format {data.get('format')!r}, expected {JSON_FORMAT!r}")
    point_fields = {f.name for f in dataclasses.fields(ThroughputPoint)}
    return Report(
        meta=data["meta"],
        baseline=Row(**data["baseline"]) if data.get("baseline") else None,
        rows=[Row(**r) for r in data["rows"]],
        throughput=[ThroughputPoint(**{k: v for k, v in p.items() if k in point_fields}) for p in data["throughput"]],
        media=[Row(**r) for r in data["media"]],
    )


def write_json(report: Report, path: Path) -> None:
    path.write_text(json.dumps(report_to_dict(report), indent=2) + "\n")


# --------------------------------------------------------------------------- the table


def _num(value: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, fmt) + suffix


def _mb(value: int) -> str:
    return f"{value / MB:.1f}" if value else "-"


def _grid(header: Sequence[str], lines: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(line) for line in lines)]


ROW_HEADER = (
    "run",
    "cache",
    "visual",
    "TTFT s",
    "x base",
    "e2e s",
    "x base",
    "tokens",
    "decode tok/s",
    "KV MB",
    "peak RSS MB",
    "encode ms",
    "hit/miss",
)


def _row_cells(row: Row) -> list[str]:
    return [
        row.name,
        row.cache,
        str(row.visual_tokens),
        f"{row.ttft_s:.3f}",
        _num(row.ttft_ratio, ".2f", "x"),
        f"{row.e2e_s:.3f}",
        _num(row.e2e_ratio, ".2f", "x"),
        str(row.completion_tokens),
        f"{row.decode_tps:.1f}" if row.decode_tps else "-",
        _mb(row.kv_bytes),
        _mb(row.peak_rss_bytes),
        f"{row.encode_ms:.0f}" if row.cache != "-" else "-",
        _num(row.hit_ratio, ".3f", "x"),
    ]


def render_table(report: Report) -> str:
    """The report as plain-text tables: runs, throughput, media, targets."""
    meta = report.meta
    out = [
        f"squint bench ({meta.get('mode', '?')}) on pack {meta.get('pack_id', '?')}, device {meta.get('device', '?')}: "
        f"median of {meta.get('repeats', '?')} cold and {meta.get('warm_repeats', '?')} warm repeats, "
        f"{meta.get('max_new_tokens', '?')} new tokens, greedy",
        "",
    ]
    rows = ([report.baseline] if report.baseline else []) + list(report.rows)
    if rows:
        out += _grid(ROW_HEADER, [_row_cells(r) for r in rows])
        out.append("")
    if report.throughput:
        out.append("Vision worker throughput (Analyze, one fresh image per call, images/s)")
        by_clients: dict[int, dict[bool, ThroughputPoint]] = {}
        for p in report.throughput:
            by_clients.setdefault(p.clients, {})[p.batching] = p
        lines = []
        for clients in sorted(by_clients):
            modes = by_clients[clients]
            off, on = modes.get(False), modes.get(True)
            lines.append(
                [
                    str(clients),
                    _num(off.images_per_s if off else None, ".2f"),
                    _num(on.images_per_s if on else None, ".2f"),
                    _num(on.images_per_s / off.images_per_s if on and off and off.images_per_s else None, ".2f", "x"),
                    _num(on.mean_batch if on and on.mean_batch else None, ".1f"),
                ]
            )
        out += _grid(("clients", "unbatched", "batched", "batched/unbatched", "images per forward"), lines)
        out.append("")
    if report.media:
        out.append("Several images and a video under one budget (the stack, cold cache)")
        lines = [
            [
                r.name,
                f"{r.kept}/{r.items}",
                str(r.budget),
                f"{r.tokens_before} -> {r.visual_tokens}",
                f"{r.encode_ms:.0f}",
                f"{r.ttft_s:.3f}",
                f"{r.e2e_s:.3f}",
                _mb(r.kv_bytes),
                _mb(r.peak_rss_bytes),
            ]
            for r in report.media
        ]
        header = (
            "request",
            "items kept",
            "budget",
            "visual tokens",
            "encode ms",
            "TTFT s",
            "e2e s",
            "KV MB",
            "peak RSS MB",
        )
        out += _grid(header, lines)
        out.append("")
    targets = report.targets
    if targets:
        out.append("Targets (ratios measured in this run)")
        lines = []
        for t in targets:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t.met]
            if t.miss:
                verdict += f" ({t.miss})"
            lines.append([t.name, _num(t.measured, ".3f", "x"), f"{t.comparison} {t.limit:g}x", verdict])
        out += _grid(("target", "measured", "limit", "verdict"), lines)
        out += [f"  {t.name}: {t.detail}" for t in targets]
    return "\n".join(out)
