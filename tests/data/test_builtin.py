"""The built-in reasoning-gym tasks: deterministic, with fixed and disjoint train, validation and test
splits."""

import pytest

from comoe.data import builtin_examples


def test_builtin_tasks_are_deterministic_and_disjoint():
    train, test = builtin_examples("train", 30), builtin_examples("test", 30)
    assert train == builtin_examples("train", 30)
    assert len({e.task for e in train}) == 5 and len(test) == 150
    assert not {e.instruction for e in train} & {e.instruction for e in test}
    assert {(e.template, e.scoring) for e in train} == {("alpaca", None)}  # the registry scores them exact


def test_builtin_validation_split_is_disjoint_from_train_and_test():
    train, validation, test = (
        builtin_examples(split, 40, ["chain_sum"]) for split in ("train", "validation", "test")
    )
    questions = [{e.instruction for e in part} for part in (train, validation, test)]
    assert len(questions[1]) == 40
    assert not questions[1] & questions[0] and not questions[1] & questions[2]
    assert builtin_examples("validation", 40, ["chain_sum"]) == validation  # fixed


def test_unknown_tasks_and_splits_are_refused():
    with pytest.raises(ValueError, match="unknown built-in tasks"):
        builtin_examples("train", 2, tasks=["nope"])
    with pytest.raises(ValueError, match="split='dev' is invalid"):
        builtin_examples("dev", 2)
