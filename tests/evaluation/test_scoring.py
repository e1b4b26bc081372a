"""comoe.evaluation.scoring: which answer a response commits to for each answer kind, whether it is right,
and per-task accuracy with the Wilson interval against its closed form."""

import math

import pytest

from comoe.data import Example
from comoe.evaluation.scoring import (
    NUMBER_TOLERANCE,
    Prediction,
    choice_options,
    choice_response,
    extract_answer,
    is_correct,
    normalise,
    option_response,
    summarise,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("kind", "text", "options", "expected"),
    [
        ("choice", "the correct answer is false", ["true", "false"], "false"),
        (
            "choice",
            "the correct answer is solution2. solution1 is wrong",
            ["solution1", "solution2"],
            "solution2",
        ),
        ("choice", "I think option1", ["option1", "option2"], "option1"),
        ("choice", "no idea", ["answer1", "answer2"], None),
        ("number", "\nA: 36 * 2/3 = 24 sq ft. 24 * 24 = 576 tiles. The answer is 576.", None, "576"),
        ("number", "She has 1,250 apples and gives -3.5 away. The answer is 1,246.5", None, "1246.5"),
        ("number", "The answer is unknown", None, None),
        ("letter", "A: the difference is $1.23. The answer is (D).", None, "D"),
        ("letter", "Rationale: ... so it is B", None, "B"),
        ("exact", "ainomma\n### extra", None, "ainomma"),
    ],
)
def test_extract_answer_on_realistic_outputs(kind, text, options, expected):
    assert extract_answer(kind, text, options) == expected


def test_is_correct_uses_tolerance_for_numbers():
    assert is_correct("number", "576", "576.0") and is_correct("number", "0.3334", "0.3333")
    assert not is_correct("number", "577", "576.0") and not is_correct("number", None, "1")
    assert is_correct("exact", "Yes.", "yes") and not is_correct("choice", "answer1", "answer2")


def test_wilson_interval_known_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 0) == [0.0, 0.0]


def test_summarise_accuracy_per_task():
    preds = [
        Prediction("a", "1", "1", True),
        Prediction("a", "1", "2", False),
        Prediction("b", "x", "x", True),
    ]
    report = summarise(preds)
    assert report["tasks"]["a"]["accuracy"] == 0.5 and report["tasks"]["b"]["n"] == 1
    assert report["average"] == 0.75


def test_choice_prefers_the_longest_option_and_reads_options_literally():
    options = [f"answer{i}" for i in range(1, 11)]
    assert extract_answer("choice", "the correct answer is answer10", options) == "answer10"
    assert extract_answer("choice", "costs $1.50 (a+b)", ["$1.50", "a+b", "1x50"]) == "$1.50"
    assert extract_answer("choice", "1x50", ["1.50"]) is None  # '.' is not a wildcard
    assert extract_answer("choice", "1x50 then $1.50", ["1.50", "$1.50"]) == "$1.50"


def test_number_takes_the_last_number_and_letter_the_stated_one():
    assert extract_answer("number", "3 apples, then 4, so 7.25", None) == "7.25"
    assert extract_answer("number", "-12", None) == "-12"
    assert extract_answer("letter", "B looks right but the answer is C, not D", None) == "C"
    assert extract_answer("letter", "(A) or (E)", None) == "E"
    assert extract_answer("letter", "Because it is an answer", None) is None  # 'A' inside words is no letter
    assert extract_answer("exact", "\n\n  Paris  \nLondon", None) == "Paris"
    assert extract_answer("exact", "  \n ", None) is None


@pytest.mark.parametrize(
    ("kind", "predicted", "answer", "expected"),
    [
        ("number", "1.001", "1", True),  # within the tolerance
        ("number", "1.0011", "1", False),
        ("number", "seven", "7", False),  # not a number: wrong, no exception
        ("number", "7", "n/a", False),
        ("exact", "  The   Eiffel tower. ", "the eiffel TOWER", True),
        ("exact", "Paris, France", "paris", False),
        ("letter", "B", "B", True),
        ("letter", "b", "B", False),
        ("choice", "true", "true", True),
        ("choice", None, "true", False),
    ],
)
def test_is_correct_per_kind(kind, predicted, answer, expected):
    assert NUMBER_TOLERANCE == 1e-3
    assert is_correct(kind, predicted, answer) is expected


def test_normalise_folds_case_whitespace_and_a_trailing_full_stop():
    assert normalise("  Hello \n  World.. ") == "hello world"
    assert normalise("Straße") == normalise("STRASSE")


@pytest.mark.parametrize(("correct", "n"), [(0, 1), (1, 1), (3, 7), (50, 100), (99, 100), (1, 1000)])
def test_wilson_interval_against_the_closed_form(correct, n):
    z, p = 1.96, correct / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    low, high = wilson_interval(correct, n)
    assert low == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert high == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert 0.0 <= low <= p <= high <= 1.0
    mirrored = wilson_interval(n - correct, n)  # symmetric: k of n right is n - k of n wrong
    assert (low, high) == pytest.approx((1 - mirrored[1], 1 - mirrored[0]), abs=1e-12)


def test_a_narrower_interval_with_more_examples_and_a_wider_one_with_a_larger_z():
    small, large = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert large[1] - large[0] < small[1] - small[0]
    default, wide = wilson_interval(5, 10), wilson_interval(5, 10, z=2.58)
    assert wide[0] < default[0] and wide[1] > default[1]


def test_choice_options_come_from_choices_or_the_answer_format_line():
    listed = Example("mine", "Which?", "", "b", "b", choices=("a", "b", "c"))
    assert choice_options(listed) == ["a", "b", "c"]
    assert option_response(listed, "b") == "b"  # scored as the option itself, as lm-eval does
    line = Example("boolq", "Is it?\n\nAnswer format: true/false", "", "", "true")
    assert choice_options(line) == ["true", "false"]
    assert option_response(line, "true") == choice_response("true") == "the correct answer is true"
    with pytest.raises(ValueError, match="^gsm8k: example has no 'Answer format:' line"):
        choice_options(Example("gsm8k", "How many?", "", "", "3"))


def test_summarise_keeps_task_order_counts_truncation_and_averages_tasks_not_examples():
    predictions = [
        Prediction("b", "1", "1", True, truncated=True),
        Prediction("a", "x", "y", False),
        Prediction("b", "1", "2", False, truncated=True),
        Prediction("b", "1", "1", True),
        Prediction("a", "x", "x", True),
    ]
    report = summarise(predictions)
    assert list(report["tasks"]) == ["b", "a"]  # as first seen
    assert report["tasks"]["b"] == {"accuracy": 2 / 3, "n": 3, "ci95": wilson_interval(2, 3), "truncated": 2}
    assert report["tasks"]["a"] == {"accuracy": 0.5, "n": 2, "ci95": wilson_interval(1, 2), "truncated": 0}
    assert report["average"] == pytest.approx((2 / 3 + 0.5) / 2)  # not 3/5
    assert summarise([]) == {"tasks": {}, "average": 0.0}


def test_a_choice_answer_without_options_is_none_not_an_empty_match():
    assert extract_answer("choice", "anything at all", []) is None
    assert extract_answer("choice", "anything at all", None) is None
    assert extract_answer("choice", "the answer is yes", ["", "yes"]) == "yes"
