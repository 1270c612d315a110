"""Score a model's answer to a :class:`~evaluation.questions.Question` as lmms-eval scores its task type.

Each question type has one scorer returning a value in [0, 1]:

- ``exact``: VQA accuracy after the EvalAI answer normalisation of VQAv2/TextVQA/GQA;
- ``yesno``: POPE's yes/no extraction, and over a set POPE's accuracy, precision, recall, F1, yes ratio;
- ``number``: the first number in the answer (digits or words) against the reference number;
- ``choice``: ScienceQA-style option-letter extraction against the reference letter or option text;
- ``anls``: DocVQA's average normalised Levenshtein similarity, thresholded at 0.5.

:func:`summarize` aggregates scored answers into the report ``squint eval`` writes.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

from evaluation.questions import ANLS, CHOICE, EXACT, NUMBER, TYPES, YESNO, Question

# --- VQA answer normalisation (EvalAI's processor, used by lmms-eval's VQAv2, TextVQA, GQA) ---

# Contractions in their written form; an answer may carry them with any of their apostrophes left
# out ("dont", "couldn'tve"), which normalisation puts back. Forms whose apostrophe-less spelling is
# an ordinary word ("let's", "we'll", "it's") are left out on purpose.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've "
    "they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_spellings(word: str) -> Iterable[str]:
    """Every spelling of ``word`` with at least one of its apostrophes left out."""
    parts = word.split("'")
    for kept in itertools.product(("'", ""), repeat=len(parts) - 1):
        if all(kept):
            continue
        yield parts[0] + "".join(mark + part for mark, part in zip(kept, parts[1:]))


_CONTRACTIONS = {spelling: word for word in _CONTRACTED for spelling in _contraction_spellings(word)}
# Number words VQA normalisation writes as digits (EvalAI's list: up to ten, and "none").
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Punctuation a mark of which is removed when it touches a space, and otherwise becomes a space
# ("black/white" -> "black white"); periods are handled apart so decimals survive.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_answer(text: str) -> str:
    """An answer in VQA's canonical form: "The Two dogs." -> "2 dogs".

    Lowercase, whitespace collapsed, commas and question marks dropped, other punctuation
    dropped or turned into a space (as EvalAI decides), periods dropped unless a digit follows,
    number words up to ten written as digits, articles removed, contractions given their
    apostrophes.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = " ".join(text.split())
    # EvalAI's rule: a mark next to a space (or any answer with a digit,digit comma) loses it;
    # elsewhere the mark separates two words.
    numeric = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        if numeric or f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD.sub("", text)
    words = [_VQA_NUMBERS.get(word, word) for word in text.split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


# A preamble models put before a short answer: "The answer is red." / "Answer: red".
_ANSWER_PREAMBLE = re.compile(r"^\s*(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\b|:)\s*", re.IGNORECASE)


def _answer_forms(answer: str) -> set[str]:
    """The normalised readings of an answer compared against references.

    The whole answer, its first line (models often explain below a short answer), and both
    without a "The answer is" / "Answer:" preamble. lmms-eval compares the whole normalised
    answer only; the other readings accept the same short answer wrapped in a sentence.
    """
    stripped = answer.strip()
    lines = stripped.splitlines()
    texts = {stripped, lines[0] if lines else ""}
    texts |= {_ANSWER_PREAMBLE.sub("", text) for text in texts}
    return {normalize_answer(text) for text in texts}


def vqa_accuracy(answer: str, references: Sequence[str]) -> float:
    """VQA accuracy of ``answer`` against annotators' ``references``.

    More than three references (VQAv2, TextVQA: ten annotators) get the official measure:
    min(1, matching references / 3) averaged over the leave-one-annotator-out subsets. One to
    three references (GQA: one) get plain exact match against any of them.
    """
    if not references:
        return 0.0
    normalised = [normalize_answer(reference) for reference in references]
    best = 0.0
    for form in _answer_forms(answer):
        if len(normalised) <= 3:
            best = max(best, float(form in normalised))
            continue
        matches = [reference == form for reference in normalised]
        total = sum(matches)
        subsets = [min(1.0, (total - matched) / 3) for matched in matches]
        best = max(best, sum(subsets) / len(subsets))
    return best


# --- Yes/no (POPE) ---

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_SENTENCE_END = re.compile(r"[.!?\n]")
_NEGATIONS = frozenset({"no", "not", "none", "cannot"})


def extract_yes_no(answer: str) -> str:
    """``"yes"`` or ``"no"``: what a free-text answer to a yes/no question says.

    A leading "yes" or "no" decides. Otherwise POPE's rule on the first sentence: a negation
    ("no", "not", "none", "cannot", or an n't contraction, with or without its apostrophe) means
    "no", anything else "yes".
    """
    words = _WORD.findall(answer.lower())
    if words and words[0] in ("yes", "no"):
        return words[0]
    first_sentence = _SENTENCE_END.split(answer.strip().lower(), maxsplit=1)[0]
    for word in _WORD.findall(first_sentence):
        if word in _NEGATIONS or _CONTRACTIONS.get(word, word).endswith("n't"):
            return "no"
    return "yes"


def _yes_no_reference(question: Question, reference: str) -> str:
    """A reference of a yes/no question as "yes" or "no"; anything else is a data error."""
    value = reference.strip().lower().rstrip(".")
    if value not in ("yes", "no"):
        raise ValueError(
            f"question {question.id} ({question.source or 'no source'}): a yesno question needs the reference "
            f"'yes' or 'no', got {reference!r}; give it type 'exact' if the answer is free text"
        )
    return value


# --- Numbers ---

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
_NUMBER = re.compile(
    r"(?<![\w.])(?P<digits>-?\d+(?:,\d{3})*(?:\.\d+)?)(?![\d])"
    rf"|\b(?P<word>{'|'.join(_NUMBER_WORDS)})\b",
    re.IGNORECASE,
)


def first_number(answer: str) -> str | None:
    """The first number in ``answer`` in digits ("1,200" -> "1200", "Seven." -> "7"), or None.

    Digits (with thousands commas and a decimal part) and the words zero to twenty count.
    """
    match = _NUMBER.search(answer)
    if match is None:
        return None
    if match["word"] is not None:
        return str(_NUMBER_WORDS.index(match["word"].lower()))
    return match["digits"].replace(",", "")


def _same_number(answer: str, reference: str) -> bool:
    """Whether the first number of the answer is the reference's (as values: "2.0" is "2").

    A reference holding no number is compared as text after VQA normalisation.
    """
    expected = first_number(reference)
    if expected is None:
        return normalize_answer(reference) in _answer_forms(answer)
    found = first_number(answer)
    return found is not None and float(found) == float(expected)


# --- Multiple choice (ScienceQA-style option letters) ---

# Letters allowed when a question lists no choices (lmms-eval's default, A to H).
_DEFAULT_LETTERS = "ABCDEFGH"
_MARKUP = re.compile(r"[*`]")
# The whole answer is a letter: "B", "b", "B.", "(B)", "B)".
_BARE_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
# A declared letter: "The answer is B", "Answer: (C)", "option D".
_DECLARED_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?i:is\b)?\s*:?\s*\(?([A-Z])\)?(?![\w'])")
# A labelled option at the start: "B. red", "(B) red", "B) red", "B: red".
_LEADING_LABEL = re.compile(r"^\(?([A-Z])[.:)]\s")
# A parenthesised letter anywhere: "I think (B) is right".
_PARENTHESISED = re.compile(r"\(([A-Z])\)")


def option_letters(choices: Sequence[str]) -> str:
    """The letters naming ``choices`` in order: A, B, C, ..."""
    if not choices:
        return _DEFAULT_LETTERS
    if len(choices) > 26:
        raise ValueError(f"a question has {len(choices)} choices, at most 26 can be named by letters")
    return "".join(chr(ord("A") + index) for index in range(len(choices)))


def _letter_in_text(text: str) -> str | None:
    """The option letter an answer names: the whole answer, else its last "answer is X", else a
    leading "X." label or a lone "(X)"; several parenthesised letters name none."""
    bare = _BARE_LETTER.match(text)
    if bare:
        return bare[1].upper()
    declared = _DECLARED_LETTER.findall(text)
    if declared:
        return declared[-1]
    parenthesised = set(_PARENTHESISED.findall(text))
    if len(parenthesised) > 1:
        return None  # "(A) or (B)": no single pick
    leading = _LEADING_LABEL.match(text)
    if leading:
        return leading[1]
    return parenthesised.pop() if parenthesised else None


def _choice_by_text(text: str, choices: Sequence[str]) -> str | None:
    """The letter of the one option whose text the answer (or its first line) is, after normalisation."""
    forms = _answer_forms(text)
    letters = option_letters(choices)
    matching = {letters[index] for index, choice in enumerate(choices) if normalize_answer(choice) in forms}
    return matching.pop() if len(matching) == 1 else None


def extract_choice(answer: str, choices: Sequence[str]) -> str | None:
    """The option letter ``answer`` picks among ``choices`` (lettered A, B, ...), or None.

    Accepts "B", "B.", "(B)", "**B**", "The answer is B", "Answer: (B)", "B. red", a lone "(B)"
    in a sentence, and the text of exactly one option ("red" -> its letter). A letter outside
    the choices, or an answer naming no single option, gives None. Letters must be capitals
    except when the answer is the letter alone, so "A dog" is not option A.
    """
    text = _MARKUP.sub("", answer).strip()
    if not text:
        return None
    letter = _letter_in_text(text) or _choice_by_text(text, choices)
    return letter if letter is not None and letter in option_letters(choices) else None


def _reference_letter(question: Question, reference: str) -> str:
    """The letter a reference names: itself when it is a letter, else the option whose text it is."""
    bare = _BARE_LETTER.match(reference.strip())
    letters = option_letters(question.choices)
    if bare and bare[1].upper() in letters:
        return bare[1].upper()
    by_text = _choice_by_text(reference, question.choices)
    if by_text is None:
        raise ValueError(
            f"question {question.id} ({question.source or 'no source'}): the reference {reference!r} is neither "
            f"an option letter ({', '.join(letters)}) nor the text of one of its choices {list(question.choices)}"
        )
    return by_text


# --- ANLS (DocVQA) ---


def levenshtein(left: str, right: str) -> int:
    """The edit distance between two strings (insertions, deletions, substitutions)."""
    if len(left) < len(right):
        left, right = right, left
    previous = list(range(len(right) + 1))
    for row, left_char in enumerate(left, start=1):
        current = [row]
        for column, right_char in enumerate(right, start=1):
            current.append(
                min(previous[column] + 1, current[column - 1] + 1, previous[column - 1] + (left_char != right_char))
            )
        previous = current
    return previous[-1]


ANLS_THRESHOLD = 0.5


def anls(answer: str, references: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Normalised Levenshtein similarity of ``answer`` to its closest reference, 0 below ``threshold``.

    As DocVQA: both sides lowercased with whitespace collapsed, similarity
    1 - distance / the longer length, the best reference kept, and a best below 0.5 scored 0
    (the answer is then taken as wrong rather than misread). The lengths are those of the
    normalised strings; DocVQA's script measures the raw ones, which differ only by whitespace.
    """
    if not references:
        return 0.0
    predicted = " ".join(answer.lower().split())
    best = 0.0
    for reference in references:
        expected = " ".join(reference.lower().split())
        longest = max(len(predicted), len(expected))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(predicted, expected) / longest
        best = max(best, similarity)
    return best if best >= threshold else 0.0


# --- Scoring a question ---


def _score_exact(question: Question, answer: str) -> float:
    return vqa_accuracy(answer, question.answers)


def _score_yes_no(question: Question, answer: str) -> float:
    said = extract_yes_no(answer)
    return float(any(said == _yes_no_reference(question, reference) for reference in question.answers))


def _score_number(question: Question, answer: str) -> float:
    return float(any(_same_number(answer, reference) for reference in question.answers))


def _score_choice(question: Question, answer: str) -> float:
    picked = extract_choice(answer, question.choices)
    return float(any(picked == _reference_letter(question, reference) for reference in question.answers))


def _score_anls(question: Question, answer: str) -> float:
    return anls(answer, question.answers)


_SCORERS: dict[str, Callable[[Question, str], float]] = {
    EXACT: _score_exact,
    YESNO: _score_yes_no,
    NUMBER: _score_number,
    CHOICE: _score_choice,
    ANLS: _score_anls,
}


def score(question: Question, answer: str) -> float:
    """How right ``answer`` is for ``question``, in [0, 1], by the rule of the question's type."""
    scorer = _SCORERS.get(question.type)
    if scorer is None:
        raise ValueError(
            f"question {question.id} ({question.source or 'no source'}) has the unknown type {question.type!r}; "
            f"the types are {', '.join(TYPES)}"
        )
    return scorer(question, answer)


# --- Aggregates ---


def pope_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """POPE's metrics over (prediction, reference) pairs of "yes"/"no", "yes" the positive class.

    Returns n, accuracy, precision, recall, f1 and yes_ratio (the share of predictions that are
    "yes", as POPE reports it; lmms-eval's aggregation counts the references' yes instead). A
    ratio with a zero denominator is 0.0.
    """
    counts = {(predicted, expected): 0 for predicted in ("yes", "no") for expected in ("yes", "no")}
    for prediction, reference in pairs:
        key = (prediction.strip().lower(), reference.strip().lower())
        if key not in counts:
            raise ValueError(f"POPE pairs are 'yes'/'no' predictions and references, got {prediction!r}, {reference!r}")
        counts[key] += 1
    true_pos, false_pos = counts["yes", "yes"], counts["yes", "no"]
    false_neg, true_neg = counts["no", "yes"], counts["no", "no"]
    total = true_pos + false_pos + false_neg + true_neg
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    return {
        "n": total,
        "accuracy": _ratio(true_pos + true_neg, total),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(true_pos + false_pos, total),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(scored: Iterable[tuple[Question, str, float]]) -> dict[str, object]:
    """The report of scored answers: (question, answer, score) triples.

    ``n``; ``accuracy``, the mean score; ``accuracy_by_type`` and ``accuracy_by_category``
    (questions with a category only), type or category -> mean score; ``pope``, POPE's metrics
    over the yes/no questions (None when there are none) and ``pope_by_category``, the same per
    category (POPE's adversarial/popular/random splits).
    """
    scores: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    by_category: dict[str, list[float]] = defaultdict(list)
    pope_pairs: list[tuple[str, str]] = []
    pope_by_category: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, value in scored:
        scores.append(value)
        by_type[question.type].append(value)
        if question.category:
            by_category[question.category].append(value)
        if question.type == YESNO and question.answers:
            pair = (extract_yes_no(answer), _yes_no_reference(question, question.answers[0]))
            pope_pairs.append(pair)
            if question.category:
                pope_by_category[question.category].append(pair)
    return {
        "n": len(scores),
        "accuracy": _mean(scores),
        "accuracy_by_type": {name: _mean(values) for name, values in sorted(by_type.items())},
        "accuracy_by_category": {name: _mean(values) for name, values in sorted(by_category.items())},
        "pope": pope_metrics(pope_pairs) if pope_pairs else None,
        "pope_by_category": {name: pope_metrics(pairs) for name, pairs in sorted(pope_by_category.items())},
    }
