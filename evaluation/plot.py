"""``pareto.png``: accuracy against mean visual tokens (left) and against median TTFT (right),
one line per compressor through its budgets, the Hugging Face baseline as a black diamond.

Drawn with PIL like the bench's plot (:mod:`bench.plot`), whose axes and text helpers it uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from bench.plot import BASELINE_COLOUR, Axes, anchored_text, colours, nice_ticks

PANEL_WIDTH, HEIGHT, LEGEND = 520, 480, 230
TOP, BOTTOM, LEFT = 50, 70, 70


def _font():
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _line_name(row) -> str:
    """The rows one line joins: a compressor with the same parameters, through its budgets."""
    params = ",".join(f"{k}={v}" for k, v in sorted(row.params.items()))
    return f"{row.compressor}:{params}" if params else row.compressor


def _panel(draw, font, left: int, rows, x_of, x_label: str, palette) -> None:
    points = [(x_of(r), 100 * r.accuracy) for r in rows]
    axes = Axes(
        tuple(nice_ticks(max((x for x, _ in points), default=1.0) * 1.05)),
        tuple(nice_ticks(100.0)),
        left=left + LEFT,
        top=TOP,
        right=left + PANEL_WIDTH - 20,
        bottom=HEIGHT - BOTTOM,
    )
    for x in axes.x_ticks:
        px, _ = axes.at(x, 0)
        draw.line([(px, axes.top), (px, axes.bottom)], fill=(230, 230, 230))
        anchored_text(draw, (px, axes.bottom + 8), f"{x:g}", font, "ma")
    for y in axes.y_ticks:
        _, py = axes.at(0, y)
        draw.line([(axes.left, py), (axes.right, py)], fill=(230, 230, 230))
        anchored_text(draw, (axes.left - 8, py), f"{y:g}", font, "rm")
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline="black")
    anchored_text(draw, ((axes.left + axes.right) / 2, HEIGHT - 25), x_label, font, "mm")
    anchored_text(draw, (axes.left, axes.top - 12), "accuracy (%)", font, "lm")
    radius = 5
    for name, colour in palette.items():
        line = sorted((r for r in rows if _line_name(r) == name), key=x_of)
        pixels = [axes.at(x_of(r), 100 * r.accuracy) for r in line]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour)
    for r in rows:
        if r.compressor == "baseline":
            px, py = axes.at(x_of(r), 100 * r.accuracy)
            d = radius + 2
            draw.polygon([(px, py - d), (px + d, py), (px, py + d), (px - d, py)], fill=BASELINE_COLOUR)


def draw_pareto(rows: Sequence, path: Path, title: str = "") -> None:
    """Write ``path`` from eval rows (anything with compressor, params, accuracy,
    visual_tokens_mean and ttft_ms_median)."""
    served = [r for r in rows if r.n and r.errors < r.n]
    compressed = [r for r in served if r.compressor != "baseline"]
    palette = colours([_line_name(r) for r in compressed])
    image = Image.new("RGB", (2 * PANEL_WIDTH + LEGEND, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    _panel(draw, font, 0, served, lambda r: r.visual_tokens_mean, "mean visual tokens", palette)
    _panel(draw, font, PANEL_WIDTH, served, lambda r: r.ttft_ms_median, "median TTFT (ms)", palette)
    anchored_text(draw, (PANEL_WIDTH, 18), title or "accuracy against visual tokens and time", font, "mm")
    y, x = TOP, 2 * PANEL_WIDTH + 10
    legend = [("baseline (HF)", BASELINE_COLOUR)] if any(r.compressor == "baseline" for r in served) else []
    for name, colour in legend + list(palette.items()):
        if colour == BASELINE_COLOUR and name.startswith("baseline"):
            draw.polygon([(x + 6, y), (x + 12, y + 6), (x + 6, y + 12), (x, y + 6)], fill=colour)
        else:
            draw.ellipse([x, y, x + 12, y + 12], fill=colour)
        anchored_text(draw, (x + 20, y + 6), name, font, "lm")
        y += 22
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
