"""The bench's PNG (drawn with PIL) and its progress bar."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bench.plot import (
    BASELINE_COLOUR,
    HEIGHT,
    WIDTH,
    Axes,
    colours,
    draw_ttft_plot,
    nice_ticks,
    plotted_points,
    x_offset,
)
from bench.progress import Progress
from bench.results import Report, Sample, aggregate


def row(name: str, cache: str, visual: int, ttft: float):
    return aggregate(name, name, cache, [Sample(ttft, ttft + 1.0, 4, visual + 40, visual)])


def report() -> Report:
    return Report(
        meta={},
        baseline=row("baseline (HF)", "-", 576, 4.0),
        rows=[row("none", "cold", 576, 3.0), row("avgpool", "cold", 144, 1.5), row("avgpool", "warm", 144, 0.5)],
    )


@pytest.mark.parametrize(
    ("high", "expected"),
    [(5.5, [0, 2, 4, 6]), (604.8, [0, 200, 400, 600, 800]), (0.9, [0, 0.2, 0.4, 0.6, 0.8, 1.0]), (0, [0, 1])],
)
def test_nice_ticks(high, expected):
    assert nice_ticks(high) == pytest.approx(expected)


def test_axes_hold_every_point_and_map_corners():
    axes = Axes.fit(plotted_points(report()))
    assert axes.x_ticks[-1] >= 576 * 1.05 and axes.y_ticks[-1] >= 4.0 * 1.05
    assert axes.at(0, 0) == (axes.left, axes.bottom)
    assert axes.at(axes.x_ticks[-1], axes.y_ticks[-1]) == (axes.right, axes.top)


def test_png_draws_each_run_where_it_belongs(tmp_path):
    path = tmp_path / "plots" / "ttft.png"
    r = report()
    draw_ttft_plot(r, path)
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
    image = image.convert("RGB")
    axes = Axes.fit(plotted_points(r))
    palette = colours([x.name for x in r.rows])

    def pixel(x: float, y: float, name: str = "", dx: int = 0) -> tuple[int, int, int]:
        px, py = axes.at(x, y)
        if name:  # each compressor's markers sit a few pixels to the side of the others'
            px += x_offset(list(palette).index(name), len(palette))
        return image.getpixel((round(px) + dx, round(py)))

    assert pixel(576, 4.0) == BASELINE_COLOUR  # the baseline's diamond
    assert pixel(576, 3.0, "none") == palette["none"]  # a cold run: a filled dot
    assert pixel(144, 1.5, "avgpool") == palette["avgpool"]
    assert pixel(144, 0.5, "avgpool") == (255, 255, 255)  # a warm run: a ring, hollow in the middle ...
    assert pixel(144, 0.5, "avgpool", dx=5) == palette["avgpool"]  # ... in the compressor's colour
    assert pixel(300, 2.5) == (255, 255, 255)  # nothing measured there (and no grid line)


def test_png_without_a_baseline(tmp_path):
    r = report()
    r.baseline = None
    draw_ttft_plot(r, tmp_path / "ttft.png")
    assert Image.open(tmp_path / "ttft.png").size == (WIDTH, HEIGHT)


def test_offsets_are_centred():
    assert [x_offset(i, 3) for i in range(3)] == [-4.0, 0.0, 4.0]
    assert x_offset(0, 1) == 0.0


def test_colours_are_stable_per_name():
    assert colours(["a", "b", "a"]) == {"a": colours(["a"])["a"], "b": colours(["x", "b"])["b"]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_without_a_terminal_writes_a_line_per_step():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(4, stream=out, width=8, clock=clock)
    progress.show("baseline")
    clock.now = 65.0
    progress.step("none: cold")
    progress.step()
    progress.note("none: 576 visual tokens")
    lines = out.getvalue().splitlines()
    assert lines == [
        "[........] 0/4 0m00s  baseline",
        "[##......] 1/4 1m05s  none: cold",
        "[####....] 2/4 1m05s  ",
        "none: 576 visual tokens",
    ]


def test_progress_never_passes_its_total():
    out = io.StringIO()
    progress = Progress(2, stream=out, width=4, clock=FakeClock())
    for _ in range(5):
        progress.step()
    assert progress.done == 2
    assert out.getvalue().splitlines()[-1].startswith("[####] 2/2")


def test_progress_on_a_terminal_redraws_in_place():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = Progress(2, stream=out, width=4, clock=FakeClock())
    progress.step("a")
    progress.step("b")
    progress.close()
    text = out.getvalue()
    assert text.count("\r\x1b[2K") == 2 and text.endswith("\n") and text.count("\n") == 1
