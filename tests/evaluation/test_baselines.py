"""comoe.evaluation.baselines on hand-made reports: chance level, majority-answer baselines (sample and
training record), predicted-answer distribution, generation quality, and the collapse warning."""

import pytest

from comoe.data import Example
from comoe.evaluation.baselines import (
    COLLAPSE_MIN_QUESTIONS,
    add_baselines,
    question_id,
    repeats,
    task_baselines,
)
from comoe.evaluation.scoring import wilson_interval


def row(answer, predicted, task="t", options=3, **fields):
    return {
        "task": task,
        "answer": answer,
        "predicted": predicted,
        "correct": answer == predicted,
        "options": options,
        **fields,
    }


def test_constant_predictions_get_the_collapse_warning():
    answers = ["answer1"] * 4 + ["answer2"] * 3 + ["answer3"] * 3
    report = {"tasks": {"t": {"accuracy": 0.3, "n": 10}}, "examples": [row(a, "answer2") for a in answers]}
    warnings = add_baselines(report)
    low, high = wilson_interval(4, 10)
    assert warnings == [
        "t: predictions collapsed: 'answer2' for 10 of 10 questions (100%), the answer to 30%; "
        f"accuracy 30.0% is no better than always answering 'answer1' (40.0%, 95% CI {100 * low:.1f}-{100 * high:.1f})"
    ]
    assert report["warnings"] == warnings and report["tasks"]["t"]["warning"] == warnings[0][3:]
    assert (
        report["tasks"]["t"]["predicted"] == {"answer2": 10}
        and report["tasks"]["t"]["distinct_predicted"] == 1
    )


def test_baselines_of_a_hand_made_report():
    rows = [
        row("a", "a", options=2),
        row("a", "b", options=2),
        row("b", "b", options=4),
        row("a", "a", options=4),
    ]
    trained = {"examples": 10, "answers": {"b": 7, "a": 3}}
    result = task_baselines(rows, trained)
    assert result["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 4 + 1 / 4) / 4)  # 1 / options, averaged
    assert result["majority"] == {"answer": "a", "accuracy": 0.75, "ci95": wilson_interval(3, 4)}
    # the training data's most frequent answer, 'b' (70% of training), answers 1 of these 4 questions
    assert result["train_majority"] == {"answer": "b", "train_share": 0.7, "accuracy": 0.25}
    assert result["predicted"] == {"a": 2, "b": 2} and result["generation"] is None
    # 75% right is still no better than always answering 'a' here (3 of 4): said, though nothing collapsed
    assert result["warning"].startswith("accuracy 75.0% is no better than always answering 'a' (75.0%")
    assert task_baselines(rows)["train_majority"] is None  # no training record: unknown


def test_spread_predictions_above_the_constant_answers_have_no_warning():
    answers = ["x", "y", "z"] * 10
    rows = [row(a, a) for a in answers[:27]] + [row(a, "x") for a in answers[27:]]
    result = task_baselines(rows)
    assert result["warning"] is None and result["predicted"] == {"x": 12, "y": 9, "z": 9}


def test_a_constant_that_is_the_answer_is_not_a_collapse_but_no_better_than_a_constant():
    rows = [row("yes", "yes", options=2)] * 19 + [row("no", "yes", options=2)]
    warning = task_baselines(rows)["warning"]
    assert "collapsed" not in warning and warning.startswith(
        "accuracy 95.0% is no better than always answering 'yes'"
    )


def test_generation_tasks_report_empty_repeated_and_unparseable_responses():
    rows = [
        row("5", "5", options=0, generated=True, response="5"),
        row("6", None, options=0, generated=True, response=""),
        row("7", None, options=0, generated=True, response="I think so."),
        row("8", "5", options=0, generated=True, response="It is 5. It is 5. It is 5."),
    ]
    result = task_baselines(rows)
    assert result["chance"] is None
    assert result["generation"] == {
        "empty": 0.25,
        "repeated": 0.25,
        "unparseable": 0.25,
        "most_frequent": {"answer": "5", "share": 0.5},
    }
    assert result["predicted"] == {"5": 2, "(none)": 2} and result["warning"] is None
    silent = [row(str(i), None, options=0, generated=True, response="hmm") for i in range(10)]
    assert task_baselines(silent)["warning"] == "no answer found in 10 of 10 questions (100%)"


def test_repeats_finds_loops_of_six_words_or_more():
    assert repeats("The answer is 5. The answer is 5. The answer is 5.")
    assert repeats("10 10 10 10 10 10") and not repeats("10 10 10")
    assert not repeats("1 + 2 = 3, so 3 + 4 = 7") and not repeats("")


def test_reports_written_before_baselines_read_without_chance_or_generation():
    report = {
        "tasks": {"t": {}},
        "examples": [{"task": "t", "answer": "a", "predicted": "a", "correct": True}],
    }
    add_baselines(report)
    assert report["tasks"]["t"]["chance"] is None and report["tasks"]["t"]["generation"] is None


def test_question_ids_follow_the_content_not_the_template():
    question = Example("t", "Which?", "", "the correct answer is a", "a", choices=("a", "b"))
    same = Example("t", "Which?", "", "the correct answer is a", "a", choices=("a", "b"), template="none")
    assert question_id(question) == question_id(same) and len(question_id(question)) == 16
    assert question_id(question) != question_id(Example("t", "Which?", "", "b", "b", choices=("a", "b")))
    assert question_id(question) != question_id(Example("u", "Which?", "", "a", "a", choices=("a", "b")))


def test_too_few_questions_get_no_collapse_warning():
    for n in range(1, COLLAPSE_MIN_QUESTIONS):  # "collapsed ... for 1 of 1 questions" said nothing
        assert task_baselines([row("a", "b")] * n)["warning"] is None
    warning = task_baselines([row("a", "b")] * COLLAPSE_MIN_QUESTIONS)["warning"]
    assert warning.startswith(f"predictions collapsed: 'b' for {COLLAPSE_MIN_QUESTIONS} of ")
