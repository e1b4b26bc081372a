"""Example: the template and scoring it carries, and grouping examples by their task."""

import pytest

from comoe.data.example import Example, group_by_task, task_index, vocabulary_ids


def test_an_example_renders_with_alpaca_and_scores_by_its_task_unless_told():
    plain = Example("boolq", "Is it?", "", "true", "true")
    assert (plain.template, plain.scoring, plain.messages, plain.choices) == ("alpaca", None, (), ())
    mine = Example("mine", "2+2?", "", "4", "4", template="none", scoring="number")
    assert (mine.template, mine.scoring) == ("none", "number")


def test_an_unknown_template_is_refused_by_task():
    with pytest.raises(ValueError, match="task 'mine' template='jinja' is invalid"):
        Example("mine", "q", "", "a", "a", template="jinja")


def test_grouping_keeps_the_order_of_first_appearance():
    examples = [Example(task, str(i), "", "", "") for i, task in enumerate(["b", "a", "b", "c", "a"])]
    assert group_by_task(examples) == {"b": [0, 2], "a": [1, 4], "c": [3]}
    assert task_index(examples) == (["b", "a", "c"], [0, 1, 0, 2, 1])
    assert group_by_task([]) == {} and task_index([]) == ([], [])


def test_vocabulary_ids_are_positions_in_the_adapters_tasks_and_minus_one_outside():
    examples = [Example(task, str(i), "", "", "") for i, task in enumerate(["b", "x", "a", "b"])]
    assert vocabulary_ids(examples, ["a", "b"]) == [1, -1, 0, 1]
    assert vocabulary_ids([], ["a"]) == []
