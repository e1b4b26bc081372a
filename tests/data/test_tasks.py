"""The task registry: every built-in and LLM-Adapters task is registered with its scoring and splits,
and an example is scored by its own scoring before its task's."""

import pytest

from comoe.data import (
    BUILTIN_TASKS,
    COMMONSENSE_TASKS,
    MATH_TASKS,
    TASKS,
    Example,
    Task,
    answer_kind,
    get_task,
    register_task,
)
from comoe.data.tasks import scoring_of


def test_task_registry_scores_every_known_task_and_accepts_new_ones():
    assert {name: TASKS[name].scoring for name in ("boolq", "gsm8k", "AQuA", "math_data", "syllogism")} == {
        "boolq": "choice",
        "gsm8k": "number",
        "AQuA": "letter",
        "math_data": "number",
        "syllogism": "exact",
    }
    assert set(TASKS) == {*BUILTIN_TASKS, *COMMONSENSE_TASKS, *MATH_TASKS, "math_data"}
    assert answer_kind("not-registered") == "exact"
    with pytest.raises(ValueError, match="task 'mine' scoring='fuzzy' is invalid"):
        Task("mine", "file", scoring="fuzzy")
    try:
        register_task(Task("mine", "file", scoring="number"))
        assert answer_kind("mine") == "number" and get_task("mine").source == "file"
    finally:
        TASKS.pop("mine")
    assert "mine" not in TASKS


def test_splits_say_which_tasks_have_validation_and_test_data():
    assert TASKS["chain_sum"].splits == ("train", "validation", "test")
    assert TASKS["boolq"].splits == ("train", "test") and TASKS["math_data"].splits == ("train",)
    assert get_task("unregistered") == Task("unregistered", "unknown", "exact")


def test_an_example_is_scored_by_its_own_scoring_then_its_task():
    assert scoring_of(Example("boolq", "Is it?", "", "true", "true")) == "choice"
    assert scoring_of(Example("AQuA", "Which?", "", "B", "B")) == "letter"
    assert scoring_of(Example("boolq", "Is it?", "", "12", "12", scoring="number")) == "number"
    assert scoring_of(Example("my-file-task", "q", "", "a", "a")) == "exact"
