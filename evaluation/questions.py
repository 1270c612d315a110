"""One typed form of an evaluation question, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# How an answer is scored (evaluation.scoring), as lmms-eval scores these task types.
EXACT = "exact"  # normalised exact match against any reference (VQAv2-style normalisation)
YESNO = "yesno"  # yes/no; the set also gets POPE's accuracy, precision, recall and F1
NUMBER = "number"  # the first number in the answer, digits or words, against the reference
CHOICE = "choice"  # multiple choice: the option letter extracted from the answer
ANLS = "anls"  # free text against several references: average normalised Levenshtein similarity
TYPES = (EXACT, YESNO, NUMBER, CHOICE, ANLS)

# A picture or a video: a file, or the bytes themselves (parquet datasets carry them inline).
Media = Path | bytes


@dataclass(frozen=True)
class Question:
    """A question about images or a video, with its reference answers.

    ``source`` names where it came from ("file:line" or "file#row") for every message about it.
    ``category`` is an optional finer grouping reported beside the type (the world's question
    family, POPE's adversarial/popular/random split).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    type: str
    images: tuple[Media, ...] = ()
    video: Media | None = None
    choices: tuple[str, ...] = ()
    category: str = ""
    source: str = ""


def read_media(media: Media) -> bytes:
    """The bytes of a picture or a video."""
    return media if isinstance(media, bytes) else Path(media).read_bytes()
