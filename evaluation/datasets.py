"""Evaluation datasets in the formats users already hold, read into :class:`Question` records.

``read_dataset(path)`` takes a JSONL file or a folder. A folder holds either Squint's own layout
(``eval.jsonl``, else ``test.jsonl``: ``squint data world DIR`` writes ``DIR/test.jsonl`` and
``DIR/val.jsonl``) or one of lmms-eval's parquet layouts, as ``huggingface-cli download
lmms-lab/NAME --repo-type dataset --local-dir DIR`` leaves it; the layout is recognised by its
files and their columns:

- ``pope`` (lmms-lab/POPE): ``data/test-*.parquet``; type yesno, category adversarial, popular
  or random.
- ``gqa`` (lmms-lab/GQA): ``testdev_balanced_instructions/testdev-*.parquet``, each question's
  picture joined on ``imageId`` from ``testdev_balanced_images/testdev-*.parquet``; type exact.
- ``textvqa_val`` (lmms-lab/textvqa): ``data/validation-*.parquet``; type exact, all ten human
  answers as references.
- ``scienceqa_img`` (lmms-lab/ScienceQA): ``ScienceQA-IMG/test-*.parquet``; type choice, the
  answer's letter as reference.

The parquet questions are worded as lmms-eval's default prompts word them (the same post-prompt,
ScienceQA's context and lettered options), so scores compare with lmms-eval's; their pictures
are the bytes of the ``image`` column (Hugging Face's ``Image`` feature, a struct of ``bytes``
and ``path``). A folder that is itself one split's folder (``DIR/data``, ``DIR/ScienceQA-IMG``)
is recognised too.

Squint's evaluation JSONL
-------------------------
One JSON object per line; blank lines are skipped::

    {"id": "s3-spatial", "image": "images/test/3.png", "question": "Where is ...?\\nA. left\\nB. right",
     "answer": "B", "type": "choice", "choices": ["left", "right"], "category": "spatial"}

``question``
    The text sent to the model as written (put any answer-format instruction in it). Required.
``image`` | ``images`` | ``video``
    Exactly one: a picture's path, a list of pictures' paths, or a video's path. Paths are
    relative to the JSONL file and must exist when the file is read.
``answer`` | ``answers``
    The reference: a string, or a list of strings (any of them counts; VQA accuracy uses all).
``type``
    How the answer is scored: ``exact`` (the default), ``yesno``, ``number``, ``choice`` or
    ``anls`` (:mod:`evaluation.questions`).
``choices``
    The options, required for ``choice``; the reference is then the option's letter (``"B"``).
``id``
    Optional, unique in the file; defaults to ``<file stem>-<line number>``.
``category``
    Optional finer grouping reported beside the type.

Other keys are ignored. An entry that breaks these rules is skipped and listed in
:attr:`Dataset.problems` (``strict=True`` raises :class:`DatasetError` at the first instead);
``limit`` keeps the first N valid questions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from evaluation.questions import CHOICE, EXACT, TYPES, YESNO, Question

logger = logging.getLogger(__name__)

# Squint's own layout: the files a dataset folder is looked up by, first found wins.
JSONL_NAMES = ("eval.jsonl", "test.jsonl")

# lmms-eval's default post-prompts (lmms_eval/tasks/{pope,gqa,textvqa}/*.yaml and scienceqa_img.yaml).
SHORT_ANSWER_PROMPT = "\nAnswer the question using a single word or phrase."
LETTER_PROMPT = "\nAnswer with the option's letter from the given choices directly."

_MEDIA_KEYS = ("image", "images", "video")
_BATCH_ROWS = 64  # parquet rows decoded at a time: a limit leaves later row groups unread


class DatasetError(ValueError):
    """A dataset that cannot be read as given; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class Problem:
    """An entry left out of a dataset: where it is ("file:line" or "file#row N", rows from 0) and why."""

    source: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass(frozen=True)
class Dataset:
    """The questions read from one path, the entries skipped and why.

    ``name`` labels the dataset in reports: the JSONL file's stem (its folder's name for a folder
    in Squint's layout) or the lmms-eval task's name (``pope``, ``gqa``, ...).
    """

    name: str
    questions: tuple[Question, ...]
    problems: tuple[Problem, ...] = ()


def read_dataset(path: Path, *, strict: bool = False, limit: int | None = None) -> Dataset:
    """Read the questions of a JSONL file or a dataset folder (see the module's docstring).

    :param strict: raise :class:`DatasetError` at the first bad entry instead of skipping it.
    :param limit: keep the first ``limit`` valid questions and stop reading there.
    :raises DatasetError: the path is missing, the folder's layout is not recognised, a file
        cannot be read, no valid question is left, or (strict) an entry is bad.
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit}")
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder; give a JSONL file or a dataset folder")
    collector = _Collector(strict=strict, limit=limit)
    if path.is_file():
        name = path.stem
        _read_jsonl(path, collector)
    else:
        name = _read_folder(path, collector)
    if not collector.questions:
        first = f"; the first: {collector.problems[0]}" if collector.problems else ""
        raise DatasetError(f"{path}: no valid questions ({len(collector.problems)} entries skipped{first})")
    logger.info(
        "read %d questions from %s (%s), skipped %d", len(collector.questions), path, name, len(collector.problems)
    )
    return Dataset(name=name, questions=tuple(collector.questions), problems=tuple(collector.problems))


class _Invalid(Exception):
    """One entry is bad; the message says why in one line (its source is added by the caller)."""


class _Collector:
    """The questions and problems gathered while a layout is read; ``strict`` raises at a problem."""

    def __init__(self, *, strict: bool, limit: int | None) -> None:
        self.strict = strict
        self.limit = limit
        self.questions: list[Question] = []
        self.problems: list[Problem] = []

    @property
    def full(self) -> bool:
        return self.limit is not None and len(self.questions) >= self.limit

    def add(self, question: Question) -> None:
        self.questions.append(question)

    def skip(self, source: str, message: str) -> None:
        if self.strict:
            raise DatasetError(f"{source}: {message}")
        self.problems.append(Problem(source, message))


# --- Folders ---------------------------------------------------------------------------------------------------------


def _read_folder(folder: Path, collector: _Collector) -> str:
    """Read the dataset a folder holds; returns the dataset's name."""
    for name in JSONL_NAMES:
        if (folder / name).is_file():
            _read_jsonl(folder / name, collector)
            return folder.name
    mismatches = []
    for layout in _LAYOUTS:
        files = layout.files(folder)
        if not files:
            continue
        columns = set(_schema(files[0]).names)
        missing = sorted(layout.columns - columns)
        if missing:
            mismatches.append(f"{files[0]} lacks {layout.task}'s columns {', '.join(missing)}")
            continue
        logger.info("%s: lmms-eval %s layout, %d parquet files", folder, layout.task, len(files))
        layout.read(folder, files, collector)
        return layout.task
    looked_for = [*JSONL_NAMES, *(f"{p} ({layout.task})" for layout in _LAYOUTS for p in layout.patterns)]
    detail = f" ({'; '.join(mismatches)})" if mismatches else ""
    raise DatasetError(f"{folder}: no dataset found{detail}; looked for {', '.join(looked_for)}")


# --- Squint's evaluation JSONL ---------------------------------------------------------------------------------------


def _read_jsonl(path: Path, collector: _Collector) -> None:
    """Read Squint's evaluation JSONL, one question per non-blank line."""
    if path.suffix == ".parquet":
        raise DatasetError(f"{path}: give the dataset's folder for lmms-eval's parquet layouts, not one file")
    first_line_of: dict[str, int] = {}
    try:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if collector.full:
                    return
                if not raw.strip():
                    continue
                source = f"{path}:{number}"
                try:
                    question = _jsonl_question(raw, path=path, number=number)
                    if question.id in first_line_of:
                        raise _Invalid(f"duplicate id {question.id!r} (first on line {first_line_of[question.id]})")
                except _Invalid as exc:
                    collector.skip(source, str(exc))
                    continue
                first_line_of[question.id] = number
                collector.add(question)
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _jsonl_question(raw: bytes, *, path: Path, number: int) -> Question:
    """One line of the JSONL as a question; raises :class:`_Invalid` saying what is wrong."""
    try:
        entry = json.loads(raw)
    except UnicodeDecodeError:
        raise _Invalid("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise _Invalid(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(entry, dict):
        raise _Invalid(f"expected a JSON object, got {_json_kind(entry)}")
    text = entry.get("question")
    if not isinstance(text, str) or not text.strip():
        raise _Invalid('"question" is missing or empty')
    kind = entry.get("type", EXACT)
    if not isinstance(kind, str) or kind not in TYPES:
        raise _Invalid(f'unknown "type" {kind!r}; use one of {", ".join(TYPES)}')
    choices = _strings(entry, "choices") if "choices" in entry else ()
    if kind == CHOICE and not choices:
        raise _Invalid('"type" is "choice" but "choices" is missing; list the options')
    images, video = _jsonl_media(entry, path.parent)
    return Question(
        id=_jsonl_id(entry, f"{path.stem}-{number}"),
        question=text,
        answers=_jsonl_answers(entry),
        type=kind,
        images=images,
        video=video,
        choices=choices,
        category=_optional_text(entry, "category"),
        source=f"{path}:{number}",
    )


def _jsonl_answers(entry: dict[str, Any]) -> tuple[str, ...]:
    """The references: "answer" (a string) or "answers" (a list of strings), exactly one."""
    if "answer" in entry and "answers" in entry:
        raise _Invalid('give "answer" or "answers", not both')
    if "answers" in entry:
        return _strings(entry, "answers")
    if "answer" not in entry:
        raise _Invalid('no "answer" (or "answers") given')
    answer = entry["answer"]
    if not isinstance(answer, str) or not answer.strip():
        raise _Invalid(f'"answer" must be a non-empty string, got {json.dumps(answer)}')
    return (answer,)


def _jsonl_media(entry: dict[str, Any], base: Path) -> tuple[tuple[Path, ...], Path | None]:
    """The pictures or the video, resolved against the JSONL's folder and checked to exist."""
    given = [key for key in _MEDIA_KEYS if key in entry]
    if len(given) != 1:
        raise _Invalid(f'give exactly one of "image", "images" or "video", got {", ".join(given) or "none"}')
    key = given[0]
    names = _strings(entry, key) if key == "images" else (_optional_text(entry, key),)
    paths = tuple(base / name for name in names if name)
    if not paths:
        raise _Invalid(f'"{key}" is empty')
    for media in paths:
        if not media.is_file():
            raise _Invalid(f'"{key}" file not found: {media}')
    return (paths, None) if key != "video" else ((), paths[0])


def _jsonl_id(entry: dict[str, Any], default: str) -> str:
    value = entry.get("id", default)
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise _Invalid(f'"id" must be a non-empty string or an integer, got {json.dumps(value)}')
    return str(value)


def _strings(entry: dict[str, Any], key: str) -> tuple[str, ...]:
    """A non-empty list of non-empty strings."""
    value = entry[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise _Invalid(f'"{key}" must be a non-empty list of non-empty strings, got {json.dumps(value)}')
    return tuple(value)


def _optional_text(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key, "")
    if not isinstance(value, str):
        raise _Invalid(f'"{key}" must be a string, got {json.dumps(value)}')
    return value


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


# --- lmms-eval's parquet layouts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """One of lmms-eval's parquet layouts: where its question files lie, the columns that mark
    them, and how its rows become questions."""

    task: str  # lmms-eval's task name, also the dataset's name
    patterns: tuple[str, ...]  # globs under the folder; the first that matches gives the files
    columns: frozenset[str]
    read: Callable[[Path, list[Path], _Collector], None]  # (folder, files, collector)

    def files(self, folder: Path) -> list[Path]:
        for pattern in self.patterns:
            files = sorted(folder.glob(pattern))
            if files:
                return files
        return []


def _read_pope(folder: Path, files: list[Path], collector: _Collector) -> None:
    """POPE (lmms-lab/POPE): yes/no questions about objects; ``category`` is the sampling
    (adversarial, popular, random), so ``question_id`` repeats across categories."""

    def question(row: dict[str, Any], source: str, index: int) -> Question:
        answer = _cell_text(row, "answer").strip().lower()
        if answer not in ("yes", "no"):
            raise _Invalid(f"POPE's answer must be yes or no, got {row['answer']!r}")
        category = _cell_text(row, "category")
        return Question(
            id=f"{category}-{_cell_text(row, 'question_id')}",
            question=_cell_text(row, "question").strip() + SHORT_ANSWER_PROMPT,
            answers=(answer,),
            type=YESNO,
            images=(_image_bytes(row),),
            category=category,
            source=source,
        )

    _read_rows(files, ("question_id", "question", "answer", "image", "category"), question, collector)


def _read_gqa(folder: Path, files: list[Path], collector: _Collector) -> None:
    """GQA (lmms-lab/GQA, testdev balanced): questions and pictures are separate configs; a
    question's picture is the images config's row whose ``id`` is the question's ``imageId``."""
    image_files = sorted((folder / "testdev_balanced_images").glob("testdev-*.parquet"))
    if not image_files:
        raise DatasetError(
            f"{folder}: GQA's questions without testdev_balanced_images/testdev-*.parquet; download both"
        )
    available = {str(value) for file in image_files for value in _column(file, "id")}
    chosen: list[tuple[str, dict[str, Any]]] = []
    for source, row in _rows(files, ("id", "imageId", "question", "answer"), collector, lambda: len(chosen)):
        try:
            for column in ("id", "question", "answer"):
                _cell_text(row, column)
            if str(row["imageId"]) not in available:
                raise _Invalid(f"picture {row['imageId']!r} is not in testdev_balanced_images")
        except _Invalid as exc:
            collector.skip(source, str(exc))
            continue
        chosen.append((source, row))
    pictures = _gqa_pictures(image_files, {str(row["imageId"]) for _, row in chosen})
    for source, row in chosen:
        collector.add(
            Question(
                id=str(row["id"]),
                question=row["question"] + SHORT_ANSWER_PROMPT,
                answers=(row["answer"],),
                type=EXACT,
                images=(pictures[str(row["imageId"])],),
                source=source,
            )
        )


def _gqa_pictures(image_files: list[Path], wanted: set[str]) -> dict[str, bytes]:
    """The bytes of the wanted GQA pictures, by id (the others are decoded and dropped a batch at a time)."""
    pictures: dict[str, bytes] = {}
    for file in image_files:
        for batch in _batches(file, ("id", "image")):
            for row in batch.to_pylist():
                if str(row["id"]) in wanted:
                    pictures[str(row["id"])] = _image_bytes(row)
    missing = wanted - pictures.keys()
    if missing:
        raise DatasetError(f"{image_files[0].parent}: no image bytes for GQA pictures {', '.join(sorted(missing))}")
    return pictures


def _read_textvqa(folder: Path, files: list[Path], collector: _Collector) -> None:
    """TextVQA (lmms-lab/textvqa, validation): reading text in pictures; all 10 human answers are
    references (VQA accuracy). The question is capitalised as lmms-eval does; no OCR tokens."""

    def question(row: dict[str, Any], source: str, index: int) -> Question:
        answers = row["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise _Invalid("no reference answers (TextVQA's test split has none: use the validation split)")
        return Question(
            id=_cell_text(row, "question_id"),
            question=_cell_text(row, "question").capitalize() + SHORT_ANSWER_PROMPT,
            answers=tuple(answers),
            type=EXACT,
            images=(_image_bytes(row),),
            source=source,
        )

    _read_rows(files, ("question_id", "question", "answers", "image"), question, collector)


def _read_scienceqa(folder: Path, files: list[Path], collector: _Collector) -> None:
    """ScienceQA-IMG (lmms-lab/ScienceQA, test): multiple choice with a picture; the question is
    rendered as lmms-eval renders it (context, question, lettered options, post-prompt) and the
    reference is the answer's letter. ``category`` is the subject (natural/social/language science)."""

    def question(row: dict[str, Any], source: str, index: int) -> Question:
        choices = row["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise _Invalid(f"choices must be a non-empty list of strings, got {choices!r}")
        answer = row["answer"]
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise _Invalid(f"answer index {answer!r} is not one of the {len(choices)} choices")
        hint = row.get("hint") or ""
        context = f"Context: {hint}\n" if hint else ""
        options = "\n".join(f"{_letter(i)}. {choice}" for i, choice in enumerate(choices))
        return Question(
            id=f"scienceqa-img-{index}",
            question=f"{context}{_cell_text(row, 'question')}\n{options}{LETTER_PROMPT}",
            answers=(_letter(answer),),
            type=CHOICE,
            images=(_image_bytes(row),),
            choices=tuple(choices),
            category=row.get("subject") or "",
            source=source,
        )

    _read_rows(files, ("question", "choices", "answer", "hint", "subject", "image"), question, collector)


_LAYOUTS = (
    _Layout(
        "pope",
        ("data/test-*.parquet", "test-*.parquet"),
        frozenset({"question_id", "question", "answer", "image_source", "image", "category"}),
        _read_pope,
    ),
    _Layout(
        "gqa",
        ("testdev_balanced_instructions/testdev-*.parquet",),
        frozenset({"id", "imageId", "question", "answer"}),
        _read_gqa,
    ),
    _Layout(
        "textvqa_val",
        ("data/validation-*.parquet", "validation-*.parquet"),
        frozenset({"question_id", "question", "answers", "image"}),
        _read_textvqa,
    ),
    _Layout(
        "scienceqa_img",
        ("ScienceQA-IMG/test-*.parquet", "test-*.parquet"),
        frozenset({"question", "choices", "answer", "hint", "subject", "image"}),
        _read_scienceqa,
    ),
)


def _read_rows(
    files: list[Path],
    columns: Sequence[str],
    to_question: Callable[[dict[str, Any], str, int], Question],
    collector: _Collector,
) -> None:
    """Turn each row into a question (``to_question(row, source, index)``), skipping bad rows."""
    for index, (source, row) in enumerate(_rows(files, columns, collector, lambda: len(collector.questions))):
        try:
            question = to_question(row, source, index)
        except _Invalid as exc:
            collector.skip(source, str(exc))
            continue
        collector.add(question)


def _rows(
    files: list[Path], columns: Sequence[str], collector: _Collector, kept: Callable[[], int]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each row of the files with its source ("file#row N"), until ``kept()`` reaches the limit."""
    for file in files:
        row_number = 0
        for batch in _batches(file, columns):
            for row in batch.to_pylist():
                if collector.limit is not None and kept() >= collector.limit:
                    return
                yield f"{file}#row {row_number}", row
                row_number += 1


def _batches(file: Path, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """The file's rows a batch at a time, read a row group at a time."""
    try:
        yield from pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS, columns=list(columns))
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(file, exc) from None


def _schema(file: Path) -> pa.Schema:
    try:
        return pq.read_schema(file)
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(file, exc) from None


def _column(file: Path, column: str) -> list[Any]:
    try:
        return pq.read_table(file, columns=[column]).column(column).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise _unreadable(file, exc) from None


def _unreadable(file: Path, exc: Exception) -> DatasetError:
    hint = ""
    try:
        if file.stat().st_size < 1024 and file.read_bytes().startswith(b"version https://git-lfs"):
            hint = "; it is a Git LFS pointer: download the files with huggingface-cli or git lfs pull"
    except OSError:
        pass
    return DatasetError(f"{file}: not a readable parquet file ({exc}){hint}")


def _cell_text(row: dict[str, Any], column: str) -> str:
    """A cell that must hold text (numbers, as ids, are written out)."""
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise _Invalid(f"column {column!r} is {value!r}, not text")
    return str(value)


def _image_bytes(row: dict[str, Any]) -> bytes:
    """The bytes of the row's ``image`` cell: Hugging Face's ``Image`` feature, {"bytes", "path"}."""
    value = row["image"]
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise _Invalid("no picture: the image cell has no bytes")
    return data


def _letter(index: int) -> str:
    return chr(ord("A") + index)
