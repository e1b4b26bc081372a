"""What a run trains and validates on: the shared example selection for --data and the built-in tasks,
and a seeded, disjoint validation split that covers every task."""

import pytest

from comoe.data.selection import load_examples
from comoe.data.sources import examples_from_records
from comoe.training.data import split_validation, training_data
from comoe.training.settings import TrainArgs
from tests.helpers import write_jsonl


def test_validation_split_is_seeded_disjoint_and_covers_every_task():
    records = [{"prompt": f"p{i}", "completion": "c", "task": "ab"[i % 2]} for i in range(40)]
    examples = examples_from_records(records, "test", "t")
    train, validation = split_validation(examples, 0.25, seed=3)
    again, _ = split_validation(examples, 0.25, seed=3)
    other, _ = split_validation(examples, 0.25, seed=4)
    assert len(validation) == 10 and {e.task for e in validation} == {"a", "b"}
    assert not {e.instruction for e in train} & {e.instruction for e in validation}
    assert sorted(e.instruction for e in train + validation) == sorted(e.instruction for e in examples)
    assert again == train and other != train
    with pytest.raises(ValueError, match="no task has two examples to split"):
        split_validation(examples[:1], 0.5, seed=0)


def test_training_data_selects_like_evaluation_and_holds_out_a_fraction(tmp_path):
    builtin, none = training_data(TrainArgs(tasks=["syllogism"], train_limit=4))
    assert builtin == load_examples(None, ["syllogism"], "train", 4, 0) and none == []
    rows = [{"instruction": f"q{i}", "output": "o", "task": "ab"[i % 2]} for i in range(12)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    train, validation = training_data(TrainArgs(data=[str(path)], train_limit=4, val_fraction=0.25))
    assert len(train) + len(validation) == 8 and {e.task for e in validation} == {"a", "b"}
    assert {(e.template, e.scoring) for e in train + validation} == {("alpaca", "exact")}
