"""Scoring answers as lmms-eval does, on hand-worked examples of every question type."""

from __future__ import annotations

import pytest

from evaluation.questions import ANLS, CHOICE, EXACT, NUMBER, TYPES, YESNO, Question
from evaluation.scoring import (
    anls,
    extract_choice,
    extract_yes_no,
    first_number,
    levenshtein,
    normalize_answer,
    pope_metrics,
    score,
    summarize,
    vqa_accuracy,
)

COLOURS = ("red", "green", "blue")


def question(kind: str, *answers: str, choices: tuple[str, ...] = (), category: str = "") -> Question:
    return Question(
        id="q1",
        question="?",
        answers=answers,
        type=kind,
        choices=choices,
        category=category,
        source="test.jsonl:1",
    )


@pytest.mark.parametrize("kind", TYPES)
def test_every_type_has_a_scorer(kind):
    assert score(question(kind, "yes", choices=("yes", "no")), "Yes") == 1.0


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two.", "2"),
        ("the red", "red"),
        ("  A Dog  ", "dog"),
        ("An apple", "apple"),
        ("Ten dogs!", "10 dogs"),
        ("none", "0"),
        ("dont", "don't"),
        ("couldn'tve", "couldn't've"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("black/white", "black white"),
        ("t-shirt", "t shirt"),
        ("yes - it is", "yes it is"),
        ("Is it?", "is it"),
        ("the man's hat", "man 's hat"),
        ("Line one\nline two", "line 1 line 2"),
    ],
)
def test_normalize_answer_follows_evalai(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_matches_the_normalised_answer_or_its_first_line():
    assert score(question(EXACT, "red"), "Red.") == 1.0
    assert score(question(EXACT, "red"), "The red.") == 1.0
    assert score(question(EXACT, "red"), "The answer is red.") == 1.0
    assert score(question(EXACT, "red"), "Answer: red") == 1.0
    assert score(question(EXACT, "red"), "red\nIt is the colour of the ball.") == 1.0
    assert score(question(EXACT, "2"), "Two") == 1.0
    assert score(question(EXACT, "red", "crimson"), "crimson") == 1.0
    assert score(question(EXACT, "red"), "red and blue") == 0.0
    assert score(question(EXACT, "red"), "It is red.") == 0.0


def test_exact_with_ten_annotators_is_vqa_leave_one_out_accuracy():
    references = ["red"] * 3 + ["blue"] * 7
    # Leaving out a "red" annotator leaves 2 matches (2/3), leaving out a "blue" one 3 (1): (3*2/3 + 7) / 10.
    assert score(question(EXACT, *references), "Red.") == pytest.approx(0.9)
    assert vqa_accuracy("blue", references) == pytest.approx(1.0)
    # One match: 9 subsets with 1 match (1/3), one with none.
    assert vqa_accuracy("green", ["green"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("purple", references) == 0.0
    assert vqa_accuracy("red", []) == 0.0


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("No, there is not.", "no"),
        ("Yes, there is no other dog.", "yes"),
        ("There is no dog in the image.", "no"),
        ("There isn't a dog.", "no"),
        ("There isnt a dog", "no"),
        ("The dog is not present.", "no"),
        ("There is a dog in the image.", "yes"),
        ("There is a dog. It is not brown.", "yes"),
        ("'Yes'", "yes"),
    ],
)
def test_extract_yes_no(answer, said):
    assert extract_yes_no(answer) == said


def test_yes_no_scores_against_the_reference():
    assert score(question(YESNO, "yes"), "Yes, there is.") == 1.0
    assert score(question(YESNO, "No"), "There is no car.") == 1.0
    assert score(question(YESNO, "yes"), "No.") == 0.0
    with pytest.raises(ValueError, match=r"q1 \(test.jsonl:1\).*'yes' or 'no', got 'maybe'"):
        score(question(YESNO, "maybe"), "yes")


@pytest.mark.parametrize(
    ("answer", "number"),
    [
        ("3", "3"),
        ("There are three dogs.", "3"),
        ("Seven.", "7"),
        ("seventeen", "17"),
        ("twenty", "20"),
        ("I count 12 cars and two bikes", "12"),
        ("1,200 people", "1200"),
        ("It is 2.5 metres", "2.5"),
        ("-4 degrees", "-4"),
        ("There are 3.", "3"),
        ("someone", None),
        ("many", None),
        ("", None),
    ],
)
def test_first_number(answer, number):
    assert first_number(answer) == number


def test_number_compares_values():
    assert score(question(NUMBER, "2"), "There are two cats.") == 1.0
    assert score(question(NUMBER, "2"), "2.0") == 1.0
    assert score(question(NUMBER, "two"), "2") == 1.0
    assert score(question(NUMBER, "2"), "3 cats, not 2") == 0.0
    assert score(question(NUMBER, "2"), "several") == 0.0
    # A reference that is no number is compared as normalised text.
    assert score(question(NUMBER, "many"), "Many.") == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "B",
        "b",
        "B.",
        "(B)",
        "B)",
        "**B**",
        "The answer is B",
        "The answer is B.",
        "The correct answer is (B) green.",
        "Answer: B",
        "B. green",
        "(B) green",
        "B: green",
        "I think (B) is right.",
        "green",
        "Green.",
        "The green",
    ],
)
def test_extract_choice_reads_the_letter_from_many_phrasings(answer):
    assert extract_choice(answer, COLOURS) == "B"


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "D",  # not one of three options
        "A dog is shown",  # an article, not a label
        "I am not sure",
        "(A) or (B)",
        "purple",
    ],
)
def test_extract_choice_gives_none_without_a_single_option(answer):
    assert extract_choice(answer, COLOURS) is None


def test_extract_choice_without_choices_accepts_a_to_h():
    assert extract_choice("H", ()) == "H"
    assert extract_choice("I", ()) is None


def test_choice_reference_is_a_letter_or_an_option_text():
    assert score(question(CHOICE, "B", choices=COLOURS), "The answer is B.") == 1.0
    assert score(question(CHOICE, "green", choices=COLOURS), "B. green") == 1.0
    assert score(question(CHOICE, "blue", choices=COLOURS), "blue") == 1.0
    assert score(question(CHOICE, "C", choices=COLOURS), "B") == 0.0
    assert score(question(CHOICE, "C", choices=COLOURS), "no idea") == 0.0
    with pytest.raises(ValueError, match=r"'purple' is neither an option letter \(A, B, C\)"):
        score(question(CHOICE, "purple", choices=COLOURS), "A")


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_anls():
    assert anls("hel1o", ["hello"]) == pytest.approx(0.8)
    assert anls("  HELLO ", ["hello"]) == 1.0
    assert anls("new  york", ["New York"]) == 1.0
    # The best reference counts.
    assert anls("hel1o", ["goodbye", "hello"]) == pytest.approx(0.8)
    # "abcd" against "abxy": similarity 0.5 is kept, "abcd" against "axyz" (0.25) is not.
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)
    assert anls("abcd", ["axyz"]) == 0.0
    assert anls("anything", []) == 0.0
    assert anls("", [""]) == 1.0
    assert score(question(ANLS, "hello", "hi"), "hel1o") == pytest.approx(0.8)
    assert score(question(ANLS, "hello"), "world") == 0.0


def test_unknown_type_is_named_with_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown type 'essay'; the types are exact, yesno, number, choice, anls"):
        score(question("essay", "x"), "x")


def pairs(true_pos: int, false_pos: int, false_neg: int, true_neg: int) -> list[tuple[str, str]]:
    return (
        [("yes", "yes")] * true_pos
        + [("yes", "no")] * false_pos
        + [("no", "yes")] * false_neg
        + [("no", "no")] * true_neg
    )


def test_pope_metrics_on_a_hand_worked_confusion_matrix():
    metrics = pope_metrics(pairs(true_pos=3, false_pos=1, false_neg=2, true_neg=4))
    assert metrics["n"] == 10
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["precision"] == pytest.approx(0.75)
    assert metrics["recall"] == pytest.approx(0.6)
    assert metrics["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert metrics["f1"] == pytest.approx(0.6667, abs=1e-4)
    assert metrics["yes_ratio"] == pytest.approx(0.4)


def test_pope_metrics_divide_by_zero_as_zero():
    assert pope_metrics([]) == {"n": 0, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    all_no = pope_metrics(pairs(true_pos=0, false_pos=0, false_neg=2, true_neg=3))
    assert all_no["precision"] == 0.0
    assert all_no["recall"] == 0.0
    assert all_no["f1"] == 0.0
    assert all_no["accuracy"] == pytest.approx(0.6)


def test_pope_metrics_refuse_other_values():
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics([("maybe", "yes")])


def test_summarize():
    answered = [
        (question(YESNO, "yes", category="random"), "Yes"),
        (question(YESNO, "no", category="random"), "Yes"),
        (question(YESNO, "no", category="adversarial"), "No"),
        (question(EXACT, "red"), "red"),
        (question(CHOICE, "A", choices=COLOURS, category="colour"), "B"),
    ]
    report = summarize((q, answer, score(q, answer)) for q, answer in answered)
    assert report["n"] == 5
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["accuracy_by_type"] == {"choice": 0.0, "exact": 1.0, "yesno": pytest.approx(2 / 3)}
    assert report["accuracy_by_category"] == {"adversarial": 1.0, "colour": 0.0, "random": 0.5}
    pope = report["pope"]
    assert pope["n"] == 3
    assert pope["precision"] == pytest.approx(0.5)
    assert pope["recall"] == 1.0
    assert pope["yes_ratio"] == pytest.approx(2 / 3)
    assert report["pope_by_category"]["adversarial"]["accuracy"] == 1.0
    assert report["pope_by_category"]["random"]["accuracy"] == 0.5


def test_summarize_without_yes_no_questions_has_no_pope():
    q = question(NUMBER, "4")
    report = summarize([(q, "four", score(q, "four"))])
    assert report["pope"] is None
    assert report["pope_by_category"] == {}
    assert report["accuracy_by_category"] == {}
    assert summarize([])["accuracy"] == 0.0
