"""squint eval through the real stack: the grid of the issue, and greedy parity at the level of a
whole evaluation (the `none` row answers every question as Hugging Face does)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from evaluation.world import WorldSettings, write_world
from squint.app.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_eval_runs_the_grid_through_the_stack_and_none_answers_as_the_baseline(
    default_stack, tiny_pack, tmp_path, capsys
):
    world = tmp_path / "world"
    write_world(world, WorldSettings(seed=5, train=0, val=0, test=32, train_videos=0, val_videos=0, test_videos=0))
    out = tmp_path / "eval"
    argv = ["eval", str(world), "--address", default_stack.orchestrator_address, "--pack", str(tiny_pack.root)]
    argv += ["--compressor", "none", "--compressor", "avgpool:stride=2", "--compressor", "text_recovery"]
    argv += ["--budget", "64", "--baseline", "--limit", "50", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "avgpool:stride=2 @64" in printed and "wrote eval.json" in printed

    report = json.loads((out / "eval.json").read_text())
    assert report["format"] == "squint-eval/1"
    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == ["baseline (HF)", "none", "avgpool:stride=2 @64", "text_recovery @64"]
    for row in rows.values():
        assert row["n"] == 50 and row["errors"] == 0, row
        assert set(row["accuracy_by_category"]) == {"attribute", "existence", "count", "spatial", "detail"}
    assert rows["none"]["visual_tokens_mean"] == rows["baseline (HF)"]["visual_tokens_mean"] == 576
    assert rows["avgpool:stride=2 @64"]["visual_tokens_mean"] == 64
    assert 0 < rows["text_recovery @64"]["visual_tokens_mean"] <= 64
    assert rows["none"]["retained"] == 1.0
    assert (out / "table.txt").read_text().startswith("configuration")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    answers: dict[str, dict[str, str]] = {}
    for line in (out / "answers.jsonl").read_text().splitlines():
        answer = json.loads(line)
        answers.setdefault(answer["configuration"], {})[answer["id"]] = answer["answer"]
    none, baseline = answers["none"], answers["baseline (HF)"]
    assert len(none) == 50
    differing = [qid for qid in none if none[qid] != baseline[qid]]
    assert not differing, f"{len(differing)} answers differ from the baseline's, first {differing[0]}"
    # The tiny model's answers depend on the picture and the question, so the parity is not vacuous.
    assert len(Counter(none.values())) >= 3
