"""What ``squint bench`` measured: samples, their medians, the targets, the table and the JSON.

Pure: nothing here starts a server or reads a clock, so the aggregation and the writers are
tested on fabricated measurements (tests/unit/bench).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JSON_FORMAT = "squint-bench/2"
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
    engine: str = ""  # the LLM engine whose generated-token counter moved ("vllm", "staged"); "": not seen
    first_tokens: int = 1  # tokens in the first message that had any (an engine may send several at once)


@dataclass(frozen=True)
class Row:
    """The medians of one configuration's samples, and its ratios to the baseline."""

    name: str  # "baseline (HF)", "none", "staged_pool layer=2", "8 images", ...
    compressor: str  # "" for the baseline
    # "-" (no cache: the baseline), "cold" (every item a miss), "warm" (every item a hit) or
    # "new q" (the image's features cached, the question new: text_recovery's question embedding)
    cache: str
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
    hit_ratio: float | None = None  # warm and "new q" rows: encode_ms / the same case's cold encode_ms
    engine: str = ""  # the LLM engine that served it ("vllm", "staged"); "" for the baseline
    prompt_tokens: int = 0  # the prompt's length, visual tokens included (median)
    floor_s: float | None = None  # cold rows: CLIP alone + this engine's prefill of this prompt, measured
    floor_ratio: float | None = None  # ttft_s / floor_s

    @property
    def label(self) -> str:
        """The name, with the engine when it is not vLLM (the plot's legend)."""
        return f"{self.name} [{self.engine}]" if self.engine and self.engine != "vllm" else self.name


@dataclass(frozen=True)
class StreamPoint:
    """Concurrent streams against the stack, each sending its requests one after another."""

    engine: str  # "vllm" or "staged"
    streams: int
    compressor: str
    requests: int  # finished requests, over all streams
    tokens: int  # generated tokens, over all streams
    seconds: float  # wall time from the first request sent to the last answer
    ttft_p50_s: float
    ttft_p99_s: float
    decode_tps: float = 0.0  # median per-request decode rate (tokens after the first per second)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, linear between closest ranks; 0.0 for none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stream_point(engine: str, streams: int, compressor: str, samples: Sequence[Sample], seconds: float) -> StreamPoint:
    """The point of ``streams`` concurrent streams whose requests gave ``samples`` in ``seconds``."""
    ttfts = [s.ttft_s for s in samples]
    return StreamPoint(
        engine=engine,
        streams=streams,
        compressor=compressor,
        requests=len(samples),
        tokens=sum(s.completion_tokens for s in samples),
        seconds=seconds,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        decode_tps=_median(r for s in samples if (r := decode_rate(s)) is not None),
    )


@dataclass(frozen=True)
class PrefillFloor:
    """The LLM alone: time to the first token of a prompt whose visual tokens are given, sent to
    the engine's Triton model directly (no vision worker, no orchestrator)."""

    engine: str
    prompt_tokens: int
    visual_tokens: int
    seconds: float  # median
    repeats: int


@dataclass(frozen=True)
class Floors:
    """What no compressor removes from a cold request, measured in the same run."""

    clip_s: float  # one image decoded, preprocessed and through CLIP to its feature layer (median)
    clip_repeats: int
    clip_how: str  # where and how CLIP ran
    prefill: tuple[PrefillFloor, ...] = ()

    def prefill_for(self, engine: str, prompt_tokens: int, visual_tokens: int) -> PrefillFloor | None:
        for floor in self.prefill:
            if (floor.engine, floor.prompt_tokens, floor.visual_tokens) == (engine, prompt_tokens, visual_tokens):
                return floor
        return None

    def of(self, row: Row) -> float | None:
        """``row``'s floor: CLIP alone + its engine's prefill of its prompt; None when not measured."""
        prefill = self.prefill_for(row.engine, row.prompt_tokens, row.visual_tokens)
        return None if prefill is None else self.clip_s + prefill.seconds


def with_floors(rows: Sequence[Row], floors: Floors | None, pooled: Collection[str] = ()) -> list[Row]:
    """``rows`` with their floor and TTFT-to-floor ratio, the cold ones whose floor was measured;
    none for the rows named in ``pooled`` (pooling inside the LLM: their prefill is not a plain one,
    whatever prompt of the same length was measured)."""
    out = []
    for row in rows:
        floor = floors.of(row) if floors is not None and row.cache == "cold" and row.name not in pooled else None
        out.append(
            dataclasses.replace(row, floor_s=floor, floor_ratio=row.ttft_s / floor if floor else None) if floor else row
        )
    return out


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
    rows: list[Row] = field(default_factory=list)  # the stack: cold and warm per case and engine
    throughput: list[ThroughputPoint] = field(default_factory=list)  # vision micro-batching (informational)
    media: list[Row] = field(default_factory=list)
    streams: list[StreamPoint] = field(default_factory=list)
    floors: Floors | None = None

    @property
    def targets(self) -> list[Target]:
        return evaluate_targets(self.baseline, self.rows, self.streams)


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else 0.0


def decode_rate(sample: Sample) -> float | None:
    """Tokens per second after the first message with tokens (the tokens it carried are not
    counted: they arrived at TTFT); None when there is nothing to divide."""
    decoding = sample.e2e_s - sample.ttft_s
    after = sample.completion_tokens - sample.first_tokens
    if after < 1 or decoding <= 0:
        return None
    return after / decoding


def aggregate(
    name: str,
    compressor: str,
    cache: str,
    samples: Sequence[Sample],
    *,
    baseline: Row | None = None,
    cold: Row | None = None,
    budget: int = 0,
    engine: str = "",
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
        engine=engine,
        prompt_tokens=round(_median(s.prompt_tokens for s in samples)),
    )


def with_baseline(row: Row, baseline: Row) -> Row:
    """``row`` with its TTFT and end-to-end ratios to ``baseline``."""
    return dataclasses.replace(
        row,
        ttft_ratio=row.ttft_s / baseline.ttft_s if baseline.ttft_s else None,
        e2e_ratio=row.e2e_s / baseline.e2e_s if baseline.e2e_s else None,
    )


# --------------------------------------------------------------------------- targets

DECODE_LIMIT = 1.5  # single-stream decode tokens/s over the baseline's, at least
NONE_TTFT_LIMIT = 1.05  # `none`'s TTFT over the baseline's, at most
NONE_E2E_LIMIT = 0.90  # `none`'s end to end over the baseline's, at most
AVGPOOL_E2E_LIMIT = 0.75  # avgpool's cold end to end over the baseline's, at most
WARM_144_LIMIT = 0.20  # a warm 144-token TTFT over the baseline's, at most
FLOOR_LIMIT = 1.10  # a cold 144-token TTFT over its floor (CLIP alone + prefill), at most
NEW_QUESTION_LIMIT = 0.10  # text_recovery's encode for a new question on a cached image over a cold one, at most
STREAMS_LIMIT = 4.0  # tokens/s of the most streams over one stream's, at least


def _find(
    rows: Sequence[Row], cache: str, name: str | None = None, tokens: int | None = None, engine: str | None = "vllm"
) -> Row | None:
    for row in rows:
        if (
            row.cache == cache
            and (name is None or row.name == name)
            and (tokens is None or row.visual_tokens == tokens)
            and (engine is None or row.engine == engine)
        ):
            return row
    return None


def _against_baseline(name: str, limit: float, baseline: Row | None, row: Row | None, attr: str, what: str) -> Target:
    """``row``'s ``attr`` over the baseline's, at most ``limit``."""
    if baseline is None or row is None or not getattr(baseline, attr):
        return Target(name, limit, "<=", None, f"not measured: no baseline or no {what} row")
    mine, theirs = getattr(row, attr), getattr(baseline, attr)
    detail = f"{row.name} [{row.engine}] ({row.cache} cache) {mine:.3f} s vs baseline {theirs:.3f} s"
    return Target(name, limit, "<=", mine / theirs, detail)


def evaluate_targets(baseline: Row | None, rows: Sequence[Row], streams: Sequence[StreamPoint] = ()) -> list[Target]:
    """The issue's targets, each against this run's own numbers (the rows on the vLLM engine).
    Checked and reported, never asserted."""
    targets = []
    none = _find(rows, "cold", "none")
    avgpool = _find(rows, "cold", "avgpool", 144) or _find(rows, "cold", tokens=144)

    # 1. Decoding one stream: the `none` row (the baseline's prompt, alone on the engine).
    name = f"single-stream decode >= {DECODE_LIMIT:g}x the baseline's tokens/s"
    if baseline is None or none is None or not baseline.decode_tps or not none.decode_tps:
        targets.append(Target(name, DECODE_LIMIT, ">=", None, "not measured: no baseline or no `none` decode rate"))
    else:
        detail = f"none [{none.engine}] decodes {none.decode_tps:.1f} tokens/s vs baseline {baseline.decode_tps:.1f}"
        one = next((p for p in streams if p.engine == "vllm" and p.streams == 1), None)
        if one is not None and one.decode_tps:
            detail += f"; one stream of {one.compressor} {one.decode_tps:.1f}"
        targets.append(Target(name, DECODE_LIMIT, ">=", none.decode_tps / baseline.decode_tps, detail))

    # 2-3. Every visual token (`none`): the first token and the whole answer.
    targets.append(
        _against_baseline(
            f"none: TTFT <= {NONE_TTFT_LIMIT:g}x the baseline's", NONE_TTFT_LIMIT, baseline, none, "ttft_s", "`none`"
        )
    )
    target = _against_baseline(
        f"none: end to end <= {NONE_E2E_LIMIT:g}x the baseline's", NONE_E2E_LIMIT, baseline, none, "e2e_s", "`none`"
    )
    if none is not None and baseline is not None and target.measured is not None:
        target = dataclasses.replace(
            target,
            detail=target.detail + f"; {none.completion_tokens} vs {baseline.completion_tokens} tokens, decoding "
            f"{none.decode_tps:.1f} vs {baseline.decode_tps:.1f} tokens/s",
        )
    targets.append(target)

    # 4. 144 visual tokens, cold, the whole answer.
    targets.append(
        _against_baseline(
            f"avgpool cold: end to end <= {AVGPOOL_E2E_LIMIT:g}x the baseline's",
            AVGPOOL_E2E_LIMIT,
            baseline,
            avgpool,
            "e2e_s",
            "cold 144-token",
        )
    )

    # 5. 144 visual tokens, warm (the image's tokens cached), the first token.
    warm = _find(rows, "warm", avgpool.name if avgpool else "avgpool", 144)
    targets.append(
        _against_baseline(
            f"warm TTFT at 144 visual tokens <= {WARM_144_LIMIT:g}x the baseline's",
            WARM_144_LIMIT,
            baseline,
            warm,
            "ttft_s",
            "warm 144-token",
        )
    )

    # 6. 144 visual tokens, cold, against what no compressor removes.
    name = f"cold TTFT at 144 visual tokens <= {FLOOR_LIMIT:g}x its floor (CLIP + prefill)"
    if avgpool is None or avgpool.floor_s is None or avgpool.floor_ratio is None:
        targets.append(Target(name, FLOOR_LIMIT, "<=", None, "not measured: no cold 144-token row with a floor"))
    else:
        detail = f"{avgpool.name} [{avgpool.engine}] TTFT {avgpool.ttft_s:.3f} s vs floor {avgpool.floor_s:.3f} s"
        targets.append(Target(name, FLOOR_LIMIT, "<=", avgpool.floor_ratio, detail))

    # 7. A new question on a cached image: only the question's embedding is new.
    name = f"text_recovery, new question on a cached image: encode <= {NEW_QUESTION_LIMIT:g}x a cold encode"
    question = _find(rows, "new q", "text_recovery", engine=None)
    cold = _find(rows, "cold", "text_recovery", engine=question.engine) if question else None
    if question is None or cold is None or question.hit_ratio is None:
        targets.append(Target(name, NEW_QUESTION_LIMIT, "<=", None, "not measured: no text_recovery new-question row"))
    else:
        detail = f"encode {question.encode_ms:.0f} ms vs cold {cold.encode_ms:.0f} ms"
        targets.append(Target(name, NEW_QUESTION_LIMIT, "<=", question.hit_ratio, detail))

    # 8. Concurrency: the most streams against one, on vLLM.
    name = f"16 streams >= {STREAMS_LIMIT:g}x one stream's tokens/s (vLLM)"
    points = {p.streams: p for p in streams if p.engine == "vllm"}
    most = max(points, default=0)
    if 1 not in points or most <= 1 or not points[1].tokens_per_s:
        targets.append(Target(name, STREAMS_LIMIT, ">=", None, "not measured: no vLLM stream points"))
    else:
        one, many = points[1], points[most]
        detail = f"{most} streams {many.tokens_per_s:.1f} tokens/s vs one {one.tokens_per_s:.1f}"
        if most != 16:
            detail += f" ({most} streams at most in this run)"
        targets.append(Target(name, STREAMS_LIMIT, ">=", many.tokens_per_s / one.tokens_per_s, detail))
    return targets


# --------------------------------------------------------------------------- JSON


def report_to_dict(report: Report) -> dict[str, Any]:
    """The report as plain JSON types, derived values included."""

    def point(p: ThroughputPoint) -> dict[str, Any]:
        return {**dataclasses.asdict(p), "batching": p.batching, "images_per_s": p.images_per_s}

    def target(t: Target) -> dict[str, Any]:
        return {**dataclasses.asdict(t), "met": t.met, "miss": t.miss}

    def floors(f: Floors) -> dict[str, Any]:
        return {**dataclasses.asdict(f), "prefill": [dataclasses.asdict(p) for p in f.prefill]}

    def stream(p: StreamPoint) -> dict[str, Any]:
        return {**dataclasses.asdict(p), "requests_per_s": p.requests_per_s, "tokens_per_s": p.tokens_per_s}

    return {
        "format": JSON_FORMAT,
        "meta": report.meta,
        "baseline": dataclasses.asdict(report.baseline) if report.baseline else None,
        "rows": [dataclasses.asdict(r) for r in report.rows],
        "throughput": [point(p) for p in report.throughput],
        "media": [dataclasses.asdict(r) for r in report.media],
        "streams": [stream(p) for p in report.streams],
        "floors": floors(report.floors) if report.floors else None,
        "targets": [target(t) for t in report.targets],
    }


def report_from_dict(data: dict[str, Any]) -> Report:
    """The inverse of :func:`report_to_dict` (derived values are recomputed)."""
    if data.get("format") != JSON_FORMAT:
        raise ValueError(f"not a squint bench result: format {data.get('format')!r}, expected {JSON_FORMAT!r}")

    def only(cls: type, fields: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})

    floors = data.get("floors")
    return Report(
        meta=data["meta"],
        baseline=Row(**data["baseline"]) if data.get("baseline") else None,
        rows=[Row(**r) for r in data["rows"]],
        throughput=[only(ThroughputPoint, p) for p in data["throughput"]],
        media=[Row(**r) for r in data["media"]],
        streams=[only(StreamPoint, p) for p in data.get("streams", [])],
        floors=Floors(**{**floors, "prefill": tuple(PrefillFloor(**f) for f in floors["prefill"])}) if floors else None,
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
    "engine",
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
    "floor s",
    "x floor",
)


def _row_cells(row: Row) -> list[str]:
    return [
        row.name,
        row.engine or "-",
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
        _num(row.floor_s, ".3f"),
        _num(row.floor_ratio, ".2f", "x"),
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
    if report.floors is not None:
        floors = report.floors
        out.append(
            f"Floors (no compressor removes them): CLIP alone {floors.clip_s * 1000:.0f} ms "
            f"(median of {floors.clip_repeats}; {floors.clip_how}); prefill alone, first token from Triton:"
        )
        lines = [
            [
                f.engine,
                str(f.prompt_tokens),
                str(f.visual_tokens),
                f"{f.seconds:.3f}",
                f"{floors.clip_s + f.seconds:.3f}",
            ]
            for f in floors.prefill
        ]
        out += _grid(("engine", "prompt tokens", "visual", "prefill s", "floor s (CLIP + prefill)"), lines)
        out.append("")
    if report.streams:
        first = report.streams[0]
        out.append(
            f"LLM throughput: concurrent streams through the stack (compressor {first.compressor}, "
            "cached images: the vision worker only reads its cache)"
        )
        ones = {p.engine: p for p in report.streams if p.streams == 1}
        lines = [
            [
                p.engine,
                str(p.streams),
                str(p.requests),
                f"{p.requests_per_s:.2f}",
                f"{p.tokens_per_s:.1f}",
                _num(
                    p.tokens_per_s / ones[p.engine].tokens_per_s
                    if ones.get(p.engine) and ones[p.engine].tokens_per_s
                    else None,
                    ".2f",
                    "x",
                ),
                f"{p.ttft_p50_s:.3f}",
                f"{p.ttft_p99_s:.3f}",
                f"{p.decode_tps:.1f}" if p.decode_tps else "-",
            ]
            for p in report.streams
        ]
        header = (
            "engine",
            "streams",
            "requests",
            "req/s",
            "tok/s",
            "x 1 stream",
            "TTFT p50 s",
            "TTFT p99 s",
            "decode tok/s per stream",
        )
        out += _grid(header, lines)
        out.append("")
    if report.throughput:
        out.append(
            "Vision worker micro-batching (informational, no target: one CLIP forward already fills "
            "this machine's cores; Analyze, one fresh image per call, images/s)"
        )
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
