"""``squint bench``: the command. It finds (or writes) the pack, runs :func:`bench.run.run_bench`,
prints the table and writes the JSON, the PNG and the table into the output folder."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from bench.plot import draw_ttft_plot
from bench.progress import Progress
from bench.results import Report, render_table, write_json
from bench.run import run_bench, total_steps
from bench.settings import FULL, QUICK

DEFAULT_PACK_DIR = Path(".squint/packs/medium")
DEFAULT_OUT_DIR = Path(".squint/bench")
JSON_NAME, PNG_NAME, TABLE_NAME = "bench.json", "ttft.png", "table.txt"


def ensure_pack(pack_dir: Path | None, progress: Progress | None = None) -> Path:
    """The pack to measure: ``pack_dir`` when given, else the medium pack in
    ``.squint/packs/medium``, written there the first time (about 1 GB, ~20 s)."""
    from squint.packs import PackError, load_pack

    if pack_dir is not None:
        return load_pack(pack_dir).root
    try:
        return load_pack(DEFAULT_PACK_DIR).root
    except PackError:
        pass
    from squint.app.tiny_pack import write_tiny_pack

    if progress is not None:
        progress.note(f"writing the medium pack into {DEFAULT_PACK_DIR} (once; about 1 GB) ...")
    return write_tiny_pack(DEFAULT_PACK_DIR, seed=0, shape="medium").root


def write_outputs(report: Report, out_dir: Path) -> dict[str, Path]:
    """The JSON, the PNG and the table as text into ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "png": out_dir / PNG_NAME, "table": out_dir / TABLE_NAME}
    write_json(report, paths["json"])
    meta = report.meta
    draw_ttft_plot(
        report,
        paths["png"],
        title=f"TTFT against visual tokens: {meta.get('pack_id', '')} on {meta.get('device', '')} "
        f"({meta.get('mode', '')}; filled: cold cache, ring: warm)",
    )
    paths["table"].write_text(render_table(report) + "\n")
    return paths


def main(pack: str | None, out: str | None, quick: bool, device: str, redis_url: str | None) -> int:
    """``squint bench``: measure, print the table, write JSON and PNG."""
    settings = dataclasses.replace(QUICK if quick else FULL, device=device)
    progress = Progress(total_steps(settings))
    pack_root = ensure_pack(Path(pack) if pack else None, progress)
    out_dir = Path(out) if out else DEFAULT_OUT_DIR
    # Server logs go to out_dir/stack/logs; keep the terminal for the bar and the table.
    logging.getLogger().setLevel(logging.WARNING)
    report = run_bench(pack_root, out_dir, settings, redis_url=redis_url, progress=progress)
    paths = write_outputs(report, out_dir)
    progress.step("done")
    progress.close()
    print(render_table(report))
    print()
    print(f"wall time {report.meta['wall_s'] / 60:.1f} min; wrote {paths['json']}, {paths['png']} and {paths['table']}")
    return 0
