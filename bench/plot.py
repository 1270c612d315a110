"""The bench's PNG: time to first token against visual tokens, one colour per compressor.

Drawn with PIL (no plotting library): filled dots are cold-cache runs, rings warm-cache runs,
the black diamond the Hugging Face baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from bench.results import Report, Row

WIDTH, HEIGHT = 960, 600
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 250, 50, 70
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
BASELINE_COLOUR = (0, 0, 0)


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``high`` (1, 2 or 5 times a power of ten apart)."""
    if high <= 0 or not math.isfinite(high):
        return [0.0, 1.0]
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    ticks = [0.0]
    while ticks[-1] < high:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _label(value: float) -> str:
    return f"{value:g}" if value >= 1 or value == 0 else f"{value:.2g}"


def anchored_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, anchor: str) -> None:
    """``draw.text`` with an anchor (horizontal l/m/r, vertical a/m), placed by hand so that
    PIL's bitmap fallback font, which takes no anchors, works too."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    x = xy[0] - {"l": 0, "m": width / 2, "r": width}[anchor[0]] - left
    y = xy[1] - {"a": 0, "m": height / 2}[anchor[1]] - top
    draw.text((x, y), text, fill="black", font=font)


def x_offset(index: int, count: int, step: float = 4.0) -> float:
    """Pixels a compressor's markers move sideways, so runs at the same token count stay visible."""
    return (index - (count - 1) / 2) * step


def colours(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A stable colour per run name, in the order first seen."""
    out: dict[str, tuple[int, int, int]] = {}
    for name in names:
        if name not in out:
            out[name] = PALETTE[len(out) % len(PALETTE)]
    return out


@dataclass(frozen=True)
class Axes:
    """The plot area in pixels and the data ranges it shows (both start at 0)."""

    x_ticks: tuple[float, ...]
    y_ticks: tuple[float, ...]
    left: int = MARGIN_LEFT
    top: int = MARGIN_TOP
    right: int = WIDTH - MARGIN_RIGHT
    bottom: int = HEIGHT - MARGIN_BOTTOM

    @classmethod
    def fit(cls, points: Sequence[tuple[float, float]]) -> Axes:
        """Axes whose ranges hold every (tokens, seconds) point with 5% to spare."""
        return cls(
            tuple(nice_ticks(max((x for x, _ in points), default=576) * 1.05)),
            tuple(nice_ticks(max((y for _, y in points), default=1.0) * 1.05)),
        )

    def at(self, x: float, y: float) -> tuple[float, float]:
        """The pixel of data point (x, y)."""
        return (
            self.left + (self.right - self.left) * x / self.x_ticks[-1],
            self.bottom - (self.bottom - self.top) * y / self.y_ticks[-1],
        )


def plotted_rows(report: Report) -> list[Row]:
    """The rows drawn: cold and warm ones (a new question on a cached image is a table row only)."""
    return [r for r in report.rows if r.cache in ("cold", "warm")]


def plotted_points(report: Report) -> list[tuple[float, float]]:
    """(visual tokens, TTFT s) of every cold and warm row, then the baseline's."""
    points = [(float(r.visual_tokens), r.ttft_s) for r in plotted_rows(report)]
    if report.baseline is not None:
        points.append((float(report.baseline.visual_tokens), report.baseline.ttft_s))
    return points


def draw_ttft_plot(report: Report, path: Path, title: str = "") -> None:
    """Write ``path``: TTFT (s) against visual tokens for the baseline and every row."""
    rows = plotted_rows(report)
    axes = Axes.fit(plotted_points(report))
    at = axes.at
    left, top, right, bottom = axes.left, axes.top, axes.right, axes.bottom

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        font = ImageFont.load_default()

    for x in axes.x_ticks:
        px, _ = at(x, 0)
        draw.line([(px, top), (px, bottom)], fill=(230, 230, 230))
        draw.line([(px, bottom), (px, bottom + 5)], fill="black")
        anchored_text(draw, (px, bottom + 8), _label(x), font, "ma")
    for y in axes.y_ticks:
        _, py = at(0, y)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.line([(left - 5, py), (left, py)], fill="black")
        anchored_text(draw, (left - 8, py), _label(y), font, "rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    anchored_text(draw, ((left + right) / 2, HEIGHT - 25), "visual tokens in the prompt", font, "mm")
    anchored_text(draw, (left, top - 12), "TTFT (s)", font, "lm")
    title = title or "time to first token against visual tokens (filled: cold cache, ring: warm cache)"
    anchored_text(draw, ((left + right) / 2, 18), title, font, "mm")

    palette = colours([r.label for r in rows])  # the engine in the name when it is not vLLM
    radius = 6
    for row in rows:
        px, py = at(row.visual_tokens, row.ttft_s)
        px += x_offset(list(palette).index(row.label), len(palette))
        box = [px - radius, py - radius, px + radius, py + radius]
        if row.cache == "warm":
            draw.ellipse(box, outline=palette[row.label], width=3)
        else:
            draw.ellipse(box, fill=palette[row.label])
    if report.baseline is not None:
        px, py = at(report.baseline.visual_tokens, report.baseline.ttft_s)
        r = radius + 2
        draw.polygon([(px, py - r), (px + r, py), (px, py + r), (px - r, py)], fill=BASELINE_COLOUR)

    # The legend, right of the plot.
    y = top
    legend = ([("baseline (HF)", BASELINE_COLOUR)] if report.baseline is not None else []) + list(palette.items())
    for name, colour in legend:
        cx, cy = right + 25, y + 7
        if colour == BASELINE_COLOUR and name.startswith("baseline"):
            draw.polygon([(cx, cy - 7), (cx + 7, cy), (cx, cy + 7), (cx - 7, cy)], fill=colour)
        else:
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        anchored_text(draw, (cx + 15, cy), name, font, "lm")
        y += 22
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
