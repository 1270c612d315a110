"""Reading evaluation datasets: Squint's JSONL (every kind of bad entry, both modes) and tiny
parquet files in lmms-eval's POPE, GQA, TextVQA and ScienceQA-IMG layouts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from evaluation.datasets import LETTER_PROMPT, SHORT_ANSWER_PROMPT, DatasetError, Problem, read_dataset
from evaluation.questions import CHOICE, EXACT, NUMBER, YESNO, Question

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def image_cell(colour: str) -> dict:
    return {"bytes": png(colour), "path": f"{colour}.png"}


def write_parquet(path: Path, columns: dict[str, pa.Array], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    """Each line is a JSON value, or a string written as it is (for malformed and blank lines)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def media(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png("red"))
    (tmp_path / "images" / "b.png").write_bytes(png("blue"))
    (tmp_path / "clip.mp4").write_bytes(b"not really a video")
    return tmp_path


GOOD = {"id": "good", "image": "images/a.png", "question": "What colour?", "answer": "red"}


# --- Squint's JSONL ---------------------------------------------------------------------------------------------------


def test_jsonl_entries_become_questions_with_defaults(media: Path) -> None:
    path = write_jsonl(
        media / "eval.jsonl",
        [
            {"id": "q1", "image": "images/a.png", "question": "What colour?", "answer": "red", "category": "colour"},
            "",
            {"images": ["images/a.png", "images/b.png"], "question": "How many?", "answers": ["2", "two"],
             "type": NUMBER},
            {"id": 7, "video": "clip.mp4", "question": "Which way?\nA. left\nB. right", "answer": "B", "type": CHOICE,
             "choices": ["left", "right"], "extra": "ignored"},
        ],
    )  # fmt: skip

    dataset = read_dataset(path)

    assert dataset.name == "eval"
    assert dataset.problems == ()
    assert dataset.questions == (
        Question(
            id="q1",
            question="What colour?",
            answers=("red",),
            type=EXACT,
            images=(media / "images" / "a.png",),
            category="colour",
            source=f"{path}:1",
        ),
        Question(
            id="eval-3",
            question="How many?",
            answers=("2", "two"),
            type=NUMBER,
            images=(media / "images" / "a.png", media / "images" / "b.png"),
            source=f"{path}:3",
        ),
        Question(
            id="7",
            question="Which way?\nA. left\nB. right",
            answers=("B",),
            type=CHOICE,
            video=media / "clip.mp4",
            choices=("left", "right"),
            source=f"{path}:4",
        ),
    )


def test_folder_in_squint_layout_reads_eval_jsonl_before_test_jsonl(media: Path) -> None:
    write_jsonl(media / "test.jsonl", [GOOD])
    assert read_dataset(media).questions[0].source == f"{media / 'test.jsonl'}:1"
    assert read_dataset(media).name == media.name

    write_jsonl(media / "eval.jsonl", [{**GOOD, "id": "from-eval"}])
    assert [q.id for q in read_dataset(media).questions] == ["from-eval"]


def test_world_layout_paths_are_relative_to_the_jsonl(tmp_path: Path) -> None:
    world = tmp_path / "world"
    (world / "images" / "test").mkdir(parents=True)
    (world / "images" / "test" / "0.png").write_bytes(png("green"))
    write_jsonl(world / "test.jsonl", [{**GOOD, "image": "images/test/0.png"}])
    write_jsonl(world / "val.jsonl", [{**GOOD, "image": "images/val/missing.png"}])

    dataset = read_dataset(world)

    assert dataset.questions[0].images == (world / "images" / "test" / "0.png",)
    assert dataset.name == "world"


def test_limit_keeps_the_first_valid_questions(media: Path) -> None:
    path = write_jsonl(
        media / "eval.jsonl",
        [{**GOOD, "id": "a"}, "{broken", {**GOOD, "id": "b"}, {**GOOD, "id": "c"}, "also broken"],
    )

    dataset = read_dataset(path, limit=2)

    assert [q.id for q in dataset.questions] == ["a", "b"]
    assert [p.source for p in dataset.problems] == [f"{path}:2"]


BAD_LINES = {
    "malformed JSON": ('{"question": "x",', "not valid JSON"),
    "not an object": ('["a list"]', "expected a JSON object, got an array"),
    "missing question": ({"image": "images/a.png", "answer": "red"}, '"question" is missing or empty'),
    "empty question": ({**GOOD, "question": "  "}, '"question" is missing or empty'),
    "no answer": ({"image": "images/a.png", "question": "What?"}, 'no "answer" (or "answers") given'),
    "answer and answers": ({**GOOD, "answers": ["red"]}, 'give "answer" or "answers", not both'),
    "non-string answer": ({**GOOD, "answer": 3}, '"answer" must be a non-empty string, got 3'),
    "answers not a list": (
        {"image": "images/a.png", "question": "Q?", "answers": "red"},
        '"answers" must be a non-empty list of non-empty strings, got "red"',
    ),
    "answers with a number": (
        {"image": "images/a.png", "question": "Q?", "answers": ["red", 2]},
        '"answers" must be a non-empty list of non-empty strings, got ["red", 2]',
    ),
    "image and video": ({**GOOD, "video": "clip.mp4"}, "got image, video"),
    "no media": ({"question": "Q?", "answer": "red"}, 'give exactly one of "image", "images" or "video", got none'),
    "missing image file": ({**GOOD, "image": "images/nope.png"}, '"image" file not found'),
    "missing video file": (
        {"video": "nope.mp4", "question": "Q?", "answer": "left"},
        '"video" file not found',
    ),
    "unknown type": ({**GOOD, "type": "fuzzy"}, "unknown \"type\" 'fuzzy'; use one of exact, yesno, number"),
    "choice without choices": ({**GOOD, "type": CHOICE, "answer": "A"}, '"choices" is missing'),
    "bad id": ({**GOOD, "id": True}, '"id" must be a non-empty string or an integer'),
    "bad category": ({**GOOD, "category": 3}, '"category" must be a string'),
    "duplicate id": ({**GOOD, "id": "first"}, "duplicate id 'first' (first on line 1)"),
}


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
def test_bad_entry_is_skipped_with_its_line(media: Path, case: str) -> None:
    line, message = BAD_LINES[case]
    path = write_jsonl(media / "eval.jsonl", [{**GOOD, "id": "first"}, line, {**GOOD, "id": "last"}])

    dataset = read_dataset(path)

    assert [q.id for q in dataset.questions] == ["first", "last"]
    assert len(dataset.problems) == 1
    assert dataset.problems[0].source == f"{path}:2"
    assert message in dataset.problems[0].message
    assert "\n" not in dataset.problems[0].message


@pytest.mark.parametrize("case", BAD_LINES, ids=list(BAD_LINES))
def test_bad_entry_raises_in_strict_mode_naming_file_and_line(media: Path, case: str) -> None:
    line, message = BAD_LINES[case]
    path = write_jsonl(media / "eval.jsonl", [{**GOOD, "id": "first"}, line, {**GOOD, "id": "last"}])

    with pytest.raises(DatasetError) as raised:
        read_dataset(path, strict=True)

    assert str(raised.value).startswith(f"{path}:2: ")
    assert message in str(raised.value)


def test_not_utf8_line_is_a_problem(media: Path) -> None:
    path = media / "eval.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "\xff"}\n')

    assert read_dataset(path).problems == (Problem(f"{path}:2", "not UTF-8 text"),)


def test_missing_path_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file or folder"):
        read_dataset(tmp_path / "nowhere.jsonl")


def test_folder_without_a_layout_says_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")

    with pytest.raises(DatasetError) as raised:
        read_dataset(tmp_path)

    message = str(raised.value)
    assert message.startswith(f"{tmp_path}: no dataset found")
    for looked_for in ("eval.jsonl", "test.jsonl", "data/test-*.parquet (pope)", "ScienceQA-IMG/test-*.parquet"):
        assert looked_for in message


def test_empty_dataset_after_skipping_is_an_error(media: Path) -> None:
    path = write_jsonl(media / "eval.jsonl", ["", "{nope", ""])

    with pytest.raises(DatasetError, match=r"no valid questions \(1 entries skipped; the first: .*eval.jsonl:2"):
        read_dataset(path)


def test_limit_below_one_is_an_error(media: Path) -> None:
    with pytest.raises(DatasetError, match="limit must be at least 1, got 0"):
        read_dataset(write_jsonl(media / "eval.jsonl", [GOOD]), limit=0)


# --- lmms-eval's parquet layouts --------------------------------------------------------------------------------------


def write_pope(root: Path, name: str = "test-00000-of-00001.parquet", answers=("yes", "no", "maybe")) -> Path:
    n = len(answers)
    return write_parquet(
        root / "data" / name,
        {
            "id": pa.array([str(i) for i in range(n)]),
            "question_id": pa.array([str(i + 1) for i in range(n)]),
            "question": pa.array([f" Is there a dog in the image {i}? " for i in range(n)]),
            "answer": pa.array(list(answers)),
            "image_source": pa.array([f"COCO_val2014_{i}" for i in range(n)]),
            "image": pa.array([image_cell("red")] * n, type=IMAGE),
            "category": pa.array(["adversarial", "popular", "random"][:n]),
        },
    )


def test_pope_layout(tmp_path: Path) -> None:
    file = write_pope(tmp_path)

    dataset = read_dataset(tmp_path)

    assert dataset.name == "pope"
    assert dataset.questions[:2] == (
        Question(
            id="adversarial-1",
            question="Is there a dog in the image 0?\nAnswer the question using a single word or phrase.",
            answers=("yes",),
            type=YESNO,
            images=(png("red"),),
            category="adversarial",
            source=f"{file}#row 0",
        ),
        Question(
            id="popular-2",
            question="Is there a dog in the image 1?" + SHORT_ANSWER_PROMPT,
            answers=("no",),
            type=YESNO,
            images=(png("red"),),
            category="popular",
            source=f"{file}#row 1",
        ),
    )
    assert dataset.problems == (Problem(f"{file}#row 2", "POPE's answer must be yes or no, got 'maybe'"),)
    with pytest.raises(DatasetError, match=r"test-00000-of-00001.parquet#row 2: POPE's answer"):
        read_dataset(tmp_path, strict=True)


def test_pope_limit_stops_within_the_first_file(tmp_path: Path) -> None:
    write_pope(tmp_path, "test-00000-of-00002.parquet", answers=("yes", "no"))
    write_pope(tmp_path, "test-00001-of-00002.parquet", answers=("no", "yes"))

    assert [q.answers for q in read_dataset(tmp_path).questions] == [("yes",), ("no",), ("no",), ("yes",)]
    assert [q.answers for q in read_dataset(tmp_path, limit=1).questions] == [("yes",)]
    # The folder the split lies in is recognised too.
    assert read_dataset(tmp_path / "data", limit=3).questions[2].source.endswith("test-00001-of-00002.parquet#row 0")


def test_gqa_layout_joins_pictures_on_image_id(tmp_path: Path) -> None:
    questions = write_parquet(
        tmp_path / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
        {
            "id": pa.array(["201307251", "201640614", "202000000"]),
            "imageId": pa.array(["n161313", "n235859", "n000000"]),
            "question": pa.array(["Is it overcast?", "Who is wearing a shirt?", "Where is it?"]),
            "answer": pa.array(["no", "man", "here"]),
            "fullAnswer": pa.array(["No, it is clear.", "The man is wearing a shirt.", "Here."]),
            "isBalanced": pa.array([True, True, True]),
        },
    )
    write_parquet(
        tmp_path / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
        {
            "id": pa.array(["n235859", "n161313", "n999999"]),
            "image": pa.array([image_cell("blue"), image_cell("green"), image_cell("red")], type=IMAGE),
        },
    )

    dataset = read_dataset(tmp_path)

    assert dataset.name == "gqa"
    assert dataset.questions == (
        Question(
            id="201307251",
            question="Is it overcast?\nAnswer the question using a single word or phrase.",
            answers=("no",),
            type=EXACT,
            images=(png("green"),),
            source=f"{questions}#row 0",
        ),
        Question(
            id="201640614",
            question="Who is wearing a shirt?" + SHORT_ANSWER_PROMPT,
            answers=("man",),
            type=EXACT,
            images=(png("blue"),),
            source=f"{questions}#row 1",
        ),
    )
    assert dataset.problems == (Problem(f"{questions}#row 2", "picture 'n000000' is not in testdev_balanced_images"),)
    assert [q.id for q in read_dataset(tmp_path, limit=1).questions] == ["201307251"]


def test_gqa_questions_without_pictures_is_an_error(tmp_path: Path) -> None:
    write_parquet(
        tmp_path / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
        {"id": ["1"], "imageId": ["n1"], "question": ["Q?"], "answer": ["a"]},
    )
    with pytest.raises(DatasetError, match="testdev_balanced_images/testdev-\\*.parquet; download both"):
        read_dataset(tmp_path)


def test_textvqa_layout_keeps_all_answers(tmp_path: Path) -> None:
    answers = ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota", "dakota",
               "dakota", "dakota", "dakota"]  # fmt: skip
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {"question_id": [1], "question": ["x"]})
    file = write_parquet(
        tmp_path / "data" / "validation-00000-of-00001.parquet",
        {
            "image_id": pa.array(["003a8ae2ef43b901", "0054c91397f2fe05"]),
            "question_id": pa.array([34602, 34603], type=pa.int32()),
            "question": pa.array(["what is the brand of this camera?", "what does the small white text spell?"]),
            "image": pa.array([image_cell("red"), image_cell("blue")], type=IMAGE),
            "answers": pa.array([answers, None], type=pa.list_(pa.string())),
            "ocr_tokens": pa.array([["DAKOTA"], []], type=pa.list_(pa.string())),
        },
    )

    dataset = read_dataset(tmp_path)

    assert dataset.name == "textvqa_val"
    assert dataset.questions == (
        Question(
            id="34602",
            question="What is the brand of this camera?\nAnswer the question using a single word or phrase.",
            answers=tuple(answers),
            type=EXACT,
            images=(png("red"),),
            source=f"{file}#row 0",
        ),
    )
    assert dataset.problems[0].source == f"{file}#row 1"
    assert "no reference answers" in dataset.problems[0].message


def test_scienceqa_img_layout_renders_context_and_options(tmp_path: Path) -> None:
    file = write_parquet(
        tmp_path / "ScienceQA-IMG" / "test-00000-of-00001.parquet",
        {
            "image": pa.array([image_cell("red"), image_cell("blue"), image_cell("green")], type=IMAGE),
            "question": pa.array(["Which figure of speech is used?", "Which is a mammal?", "Which is it?"]),
            "choices": pa.array([["simile", "metaphor"], ["frog", "whale", "shark"], ["a", "b"]]),
            "answer": pa.array([1, 1, 5], type=pa.int8()),
            "hint": pa.array(["Life is a rollercoaster.", "", None]),
            "task": pa.array(["closed choice"] * 3),
            "subject": pa.array(["language science", "natural science", "natural science"]),
            "category": pa.array(["Figurative language", "Classification", "x"]),
        },
    )

    dataset = read_dataset(tmp_path)

    assert dataset.name == "scienceqa_img"
    assert dataset.questions == (
        Question(
            id="scienceqa-img-0",
            question="Context: Life is a rollercoaster.\nWhich figure of speech is used?\nA. simile\nB. metaphor\n"
            "Answer with the option's letter from the given choices directly.",
            answers=("B",),
            type=CHOICE,
            images=(png("red"),),
            choices=("simile", "metaphor"),
            category="language science",
            source=f"{file}#row 0",
        ),
        Question(
            id="scienceqa-img-1",
            question="Which is a mammal?\nA. frog\nB. whale\nC. shark" + LETTER_PROMPT,
            answers=("B",),
            type=CHOICE,
            images=(png("blue"),),
            choices=("frog", "whale", "shark"),
            category="natural science",
            source=f"{file}#row 1",
        ),
    )
    assert dataset.problems == (Problem(f"{file}#row 2", "answer index 5 is not one of the 2 choices"),)


def test_parquet_with_other_columns_is_named_in_the_error(tmp_path: Path) -> None:
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {"question": ["Q?"], "label": ["x"]})

    with pytest.raises(DatasetError, match=r"test-00000-of-00001.parquet lacks pope's columns answer, category"):
        read_dataset(tmp_path)


def test_git_lfs_pointer_instead_of_parquet_is_explained(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test-00000-of-00001.parquet").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 85000000\n"
    )
    with pytest.raises(DatasetError, match="not a readable parquet file .*Git LFS pointer"):
        read_dataset(tmp_path)
