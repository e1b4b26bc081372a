"""Task registry: every LLM-Adapters task loads, mixtures are seeded, bad data gives clear errors."""

import json

import pytest

from comoe.data import MATH_TASKS, answer_kind, builtin_examples, load_examples, load_task
from tests.helpers import DATA_DIR, needs_data

TEST_SIZES = {
    "boolq": 3270,
    "piqa": 1838,
    "social_i_qa": 1954,
    "winogrande": 1267,
    "ARC-Easy": 2376,
    "ARC-Challenge": 1172,
    "openbookqa": 500,
    "gsm8k": 1319,
    "AddSub": 395,
    "MultiArith": 600,
    "SingleEq": 508,
    "SVAMP": 1000,
    "AQuA": 254,
    "mawps": 238,
}


@needs_data
@pytest.mark.parametrize(("task", "size"), sorted(TEST_SIZES.items()))
def test_every_test_set_loads(task, size):
    examples = load_task(DATA_DIR, task, "test")
    assert len(examples) == size and all(e.task == task for e in examples)
    if task in MATH_TASKS and task != "AQuA":
        assert all(float(e.answer) == float(e.answer) for e in examples)  # numeric answers parse
    if answer_kind(task) == "choice":
        assert all("Answer format:" in e.instruction for e in examples)


@needs_data
def test_train_sets_and_math_training_file():
    sizes = {"boolq": 9427, "ARC-Easy": 2251, "ARC-Challenge": 1119, "openbookqa": 4957, "math_data": 3260}
    for task, size in sizes.items():
        assert len(load_task(DATA_DIR, task, "train")) == size


@needs_data
def test_hellaswag_is_registered_but_absent_with_a_clear_error():
    with pytest.raises(FileNotFoundError, match="task 'hellaswag' has no test split"):
        load_task(DATA_DIR, "hellaswag", "test")


@needs_data
def test_mixture_is_seeded_per_task_and_accepts_the_dataset_folder():
    tasks = ["boolq", "ARC-Challenge"]
    first = load_examples(DATA_DIR, tasks, "train", limit=5, seed=3)
    again = load_examples(DATA_DIR / "dataset", tasks, "train", limit=5, seed=3)
    other = load_examples(DATA_DIR, tasks, "train", limit=5, seed=4)
    assert first == again and first != other
    assert [e.task for e in first] == ["boolq"] * 5 + ["ARC-Challenge"] * 5


def test_builtin_tasks_are_deterministic_and_disjoint():
    train, test = builtin_examples("train", 30), builtin_examples("test", 30)
    assert train == builtin_examples("train", 30)
    assert len({e.task for e in train}) == 5 and len(test) == 150
    assert not {e.instruction for e in train} & {e.instruction for e in test}


def test_bad_data_errors_name_file_and_example(tmp_path):
    folder = tmp_path / "dataset" / "boolq"
    folder.mkdir(parents=True)
    (folder / "test.json").write_text("[{oops")
    with pytest.raises(ValueError, match=r"boolq/test.json: not valid JSON"):
        load_task(tmp_path, "boolq", "test")
    (folder / "test.json").write_text(
        json.dumps([{"instruction": "q", "output": "o", "answer": "a"}, {"instruction": "q"}])
    )
    with pytest.raises(ValueError, match=r"example 1 lacks field\(s\) \['output', 'answer'\]"):
        load_task(tmp_path, "boolq", "test")
    (folder / "test.json").write_text("[]")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        load_task(tmp_path, "boolq", "test")
    with pytest.raises(ValueError, match="unknown task 'boolqq'"):
        load_task(tmp_path, "boolqq", "test")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_task(tmp_path / "missing", "boolq", "test")
    with pytest.raises(ValueError, match="unknown built-in tasks"):
        builtin_examples("train", 2, tasks=["nope"])


def test_task_registry_scores_every_known_task_and_accepts_new_ones():
    from comoe.data import (
        BUILTIN_TASKS,
        COMMONSENSE_TASKS,
        TASKS,
        Example,
        Task,
        register_task,
        render_prompt,
    )

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
        register_task(Task("mine", "file", scoring="number", template="none"))
        assert answer_kind("mine") == "number"
        assert render_prompt(Example("mine", "2+2?", "", "4", "4")) == "2+2?"
        assert render_prompt(Example("boolq", "Is it?", "", "true", "true")).endswith("### Response:\n")
    finally:
        TASKS.pop("mine")


@pytest.mark.parametrize(
    ("record", "message"),
    [  # finding 4 of the reliability review: never trained on "None", "{'x': 1}", "5" or "nan"
        (
            {"instruction": "q", "output": None, "answer": "a"},
            "field 'output' must be a string, got NoneType None",
        ),
        ({"instruction": "q", "output": "o", "answer": 5}, "field 'answer' must be a string, got int 5"),
        (
            {"instruction": {"x": 1}, "output": "o", "answer": "a"},
            "field 'instruction' must be a string, got dict",
        ),
        (
            {"instruction": "q", "input": float("nan"), "output": "o", "answer": "a"},
            "field 'input' must be a string, got float nan",
        ),
    ],
)
def test_data_fields_must_be_strings(tmp_path, record, message):
    folder = tmp_path / "dataset" / "boolq"
    folder.mkdir(parents=True)
    good = {"instruction": "q", "output": "o", "answer": "a"}
    (folder / "train.json").write_text(json.dumps([good, good, record]))
    with pytest.raises(ValueError, match=rf"boolq/train.json: example 2 {message}"):
        load_task(tmp_path, "boolq", "train")


def test_invalid_utf8_names_the_file(tmp_path):
    folder = tmp_path / "dataset" / "boolq"
    folder.mkdir(parents=True)
    (folder / "train.json").write_bytes(b'[{"instruction": "\xff\xfe"}]')
    with pytest.raises(ValueError, match=r"boolq/train.json: not valid JSON"):
        load_task(tmp_path, "boolq", "train")


def test_training_only_tasks_are_refused_for_evaluation(tmp_path):
    with pytest.raises(ValueError, match=r"'math_data' has no test split \(train only\)"):
        load_examples(tmp_path, ["math_data"], "test", None)
    with pytest.raises(ValueError, match=r"limit=0 is invalid"):
        load_examples(None, ["syllogism"], "test", 0)


def test_builtin_validation_split_is_disjoint_from_train_and_test():
    train, validation, test = (
        builtin_examples(split, 40, ["chain_sum"]) for split in ("train", "validation", "test")
    )
    questions = [{e.instruction for e in part} for part in (train, validation, test)]
    assert len(questions[1]) == 40
    assert not questions[1] & questions[0] and not questions[1] & questions[2]
    assert builtin_examples("validation", 40, ["chain_sum"]) == validation  # fixed
