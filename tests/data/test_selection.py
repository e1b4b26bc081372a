"""Example selection: the one entry point of training, evaluation and analysis picks --data files, the
LLM-Adapters tasks or the built-in tasks, with a seeded per-task sample."""

import json
from dataclasses import dataclass, field

import pytest

from comoe.data import Example
from comoe.data.selection import load_examples, sample_per_task, select_examples
from comoe.evaluation.settings import EvalArgs
from comoe.training.settings import TrainArgs
from tests.helpers import DATA_DIR, needs_data, write_jsonl


@dataclass
class Source:
    """The settings select_examples reads, without a command around them."""

    data: list[str] | None = None
    format: str = "auto"
    template: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    data_dir: str | None = None
    tasks: list[str] | None = None


@needs_data
def test_mixture_is_seeded_per_task_and_accepts_the_dataset_folder():
    tasks = ["boolq", "ARC-Challenge"]
    first = load_examples(DATA_DIR, tasks, "train", limit=5, seed=3)
    again = load_examples(DATA_DIR / "dataset", tasks, "train", limit=5, seed=3)
    other = load_examples(DATA_DIR, tasks, "train", limit=5, seed=4)
    assert first == again and first != other
    assert [e.task for e in first] == ["boolq"] * 5 + ["ARC-Challenge"] * 5


def test_training_only_tasks_are_refused_for_evaluation(tmp_path):
    with pytest.raises(ValueError, match=r"'math_data' has no test split \(train only\)"):
        load_examples(tmp_path, ["math_data"], "test", None)
    with pytest.raises(ValueError, match=r"limit=0 is invalid"):
        load_examples(None, ["syllogism"], "test", 0)
    with pytest.raises(ValueError, match="name at least one task to load from --data-dir"):
        load_examples(tmp_path, None, "test", None)


def test_sample_per_task_is_seeded_and_keeps_small_tasks_whole():
    examples = [Example("a", str(i), "", "", "") for i in range(10)] + [Example("b", "only", "", "", "")]
    chosen = sample_per_task(examples, 3, seed=1)
    assert [e.task for e in chosen] == ["a", "a", "a", "b"]
    assert chosen == sample_per_task(examples, 3, seed=1)
    assert {e.instruction for e in chosen[:3]} <= {str(i) for i in range(10)}
    assert {e.instruction for e in sample_per_task(examples, 3, seed=2)[:3]} != {
        e.instruction for e in chosen[:3]
    }
    assert sample_per_task(examples, None, seed=1) is examples


def test_select_examples_reads_your_files_with_the_split_and_a_per_task_sample(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": str(i), "task": "ab"[i % 2]} for i in range(10)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    chosen = select_examples(Source(data=[str(path)]), "test", limit=2, seed=0)
    assert [e.task for e in chosen] == ["a", "a", "b", "b"]
    assert {(e.template, e.scoring) for e in chosen} == {("none", "number")}
    assert chosen == select_examples(Source(data=[str(path)]), "test", limit=2, seed=0)
    every = select_examples(Source(data=[str(path)]), "test", limit=None, seed=0)
    assert [e.instruction for e in every] == [f"p{i}" for i in range(10)]


def test_select_examples_applies_the_trained_template_where_records_accept_it(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"instruction": "What is 1 + 1?", "answer": "2"}) + "\n")
    (chat,) = select_examples(Source(data=[str(path)]), "test", None, 0, auto_template="chat")
    assert chat.template == "chat" and chat.messages == (("user", "What is 1 + 1?"), ("assistant", "2"))
    (forced,) = select_examples(Source(data=[str(path)], template="none"), "test", None, 0, "chat")
    assert forced.template == "none" and forced.messages == ()
    (default,) = select_examples(Source(data=[str(path)]), "test", None, 0)
    assert default.template == "alpaca"


def test_training_and_evaluation_settings_select_the_same_builtin_examples():
    train = select_examples(TrainArgs(tasks=["syllogism"]), "train", 3, 0)
    held_out = select_examples(EvalArgs(tasks=["syllogism"]), "test", 3, 0)
    assert train == load_examples(None, ["syllogism"], "train", 3, 0) and len(train) == 3
    assert not {e.instruction for e in train} & {e.instruction for e in held_out}
