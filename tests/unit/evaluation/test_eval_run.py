"""squint eval's grid, rows and outputs, with fake answerers (the real stack: tests/integration/test_eval.py)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from evaluation.datasets import Dataset
from evaluation.questions import CHOICE, EXACT, YESNO, Question
from evaluation.run import (
    BASELINE,
    Answer,
    Configuration,
    grid,
    parse_compressor,
    run_eval,
    write_outputs,
)
from squint.app.cli import main


def test_compressor_text_parses_to_name_and_typed_params():
    assert parse_compressor("avgpool:stride=2") == ("avgpool", {"stride": 2})
    assert parse_compressor("text_recovery:ratio=0.25,mode=fast,recover=true") == (
        "text_recovery",
        {"ratio": 0.25, "mode": "fast", "recover": True},
    )
    assert parse_compressor("none") == ("none", {})
    with pytest.raises(ValueError, match="parameter 'stride' is not k=v"):
        parse_compressor("avgpool:stride")


def test_the_grid_runs_none_once_unbudgeted_and_the_rest_once_per_budget():
    configurations = grid(["none", "avgpool:stride=2", "dfmr"], [64, 144], baseline=True)
    assert [c.label for c in configurations] == [
        "baseline (HF)",
        "none",
        "avgpool:stride=2 @64",
        "avgpool:stride=2 @144",
        "dfmr @64",
        "dfmr @144",
    ]
    assert [c.label for c in grid(["avgpool", "avgpool"], [], baseline=False)] == ["avgpool"]


QUESTIONS = (
    Question("q1", "Is there a cat?", ("yes",), YESNO, category="existence"),
    Question("q2", "Is there a dog?", ("no",), YESNO, category="existence"),
    Question("q3", "Colour?", ("red",), EXACT, category="attribute"),
    Question("q4", "Where?\nA. left\nB. right", ("B",), CHOICE, choices=("left", "right"), category="spatial"),
)


def fake_answerer(answers: dict[str, str], tokens: int, error_on: str = ""):
    def answer(question: Question, configuration: Configuration) -> Answer:
        from evaluation.scoring import score

        if question.id == error_on:
            return Answer(configuration.label, question.id, "", 0.0, error="RESOURCE_EXHAUSTED: over budget")
        text = answers[question.id]
        return Answer(configuration.label, question.id, text, score(question, text), tokens, 576, 10.0, 20.0)

    return answer


def test_rows_score_by_type_and_category_and_retain_against_none(tmp_path):
    dataset = Dataset("toy", QUESTIONS, ())
    right = {"q1": "Yes", "q2": "No.", "q3": "red", "q4": "B"}
    half = {"q1": "yes", "q2": "yes", "q3": "blue", "q4": "(B) right"}
    stack = {"none": fake_answerer(right, 576), "avgpool": fake_answerer(half, 64, error_on="q3")}

    def by_compressor(question, configuration):
        return stack[configuration.compressor](question, configuration)

    report = run_eval(
        dataset,
        grid(["none", "avgpool:stride=3"], [64], baseline=True),
        {"stack": by_compressor, BASELINE: fake_answerer(right, 576)},
        concurrency=2,
        settings={"dataset": "toy"},
    )
    rows = {r.label: r for r in report.rows}
    assert rows["none"].accuracy == 1.0 and rows["none"].retained == 1.0
    low = rows["avgpool:stride=3 @64"]
    assert low.accuracy == 0.5 and low.retained == 0.5
    assert low.accuracy_by_type == {"yesno": 0.5, "exact": 0.0, "choice": 1.0}
    assert low.accuracy_by_category == {"existence": 0.5, "attribute": 0.0, "spatial": 1.0}
    assert low.pope["precision"] == 0.5 and low.pope["recall"] == 1.0
    assert low.errors == 1 and low.first_error.startswith("RESOURCE_EXHAUSTED")
    assert low.visual_tokens_mean == 64 and low.ttft_ms_median == 10.0
    # Answers stay in question order within each configuration.
    assert [a.id for a in report.answers if a.configuration == low.label] == ["q1", "q2", "q3", "q4"]

    paths = write_outputs(report, tmp_path)
    saved = json.loads(paths["eval.json"].read_text())
    assert saved["format"] == "squint-eval/1" and len(saved["rows"]) == 3
    assert saved["rows"][2]["budget"] == 64 and saved["rows"][2]["params"] == {"stride": 3}
    assert len(paths["answers.jsonl"].read_text().splitlines()) == 12
    text = paths["table.txt"].read_text()
    assert "avgpool:stride=3 @64" in text and "1 failed, first: RESOURCE_EXHAUSTED" in text
    by_category = text.split("\n\n")[1].splitlines()
    assert by_category[0].split() == ["by", "category", "attribute", "%", "existence", "%", "spatial", "%"]
    assert next(line for line in by_category if line.startswith("avgpool")).split() == [
        "avgpool:stride=3", "@64", "0.0", "50.0", "100.0"
    ]  # fmt: skip
    picture = Image.open(io.BytesIO(paths["pareto.png"].read_bytes()))
    assert picture.size[0] > picture.size[1]
    assert len(picture.getcolors(maxcolors=1 << 20)) > 3  # lines and points were drawn, not a blank canvas


def test_the_command_names_what_is_missing_and_reports_a_bad_dataset(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "give --pack PACK" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--address", "127.0.0.1:1", "--baseline"]) == 2
    assert "--baseline needs --pack" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "a", "image": "missing.png"}\n{not json\n')
    assert main(["eval", str(bad), "--address", "127.0.0.1:1", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "Traceback" not in err
    assert main(["eval", str(bad), "--address", "127.0.0.1:1"]) == 2  # nothing valid is left
    assert "Traceback" not in capsys.readouterr().err
    assert main(["eval", str(bad), "--address", "127.0.0.1:1", "--compressor", "avgpool:stride"]) == 2
    assert "is not k=v" in capsys.readouterr().err
