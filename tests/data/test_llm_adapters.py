"""The LLM-Adapters files: every task split loads with its size, and bad data gives clear errors naming the
file and the example."""

import json

import pytest

from comoe.data import MATH_TASKS, answer_kind, load_task
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


def test_examples_are_alpaca_prompted_and_scored_by_their_task(tmp_path):
    folder = tmp_path / "dataset" / "gsm8k"
    folder.mkdir(parents=True)
    record = {"instruction": "2+2?", "input": "", "output": "2+2=4. The answer is 4", "answer": "4"}
    (folder / "test.json").write_text(json.dumps([record]))
    (example,) = load_task(tmp_path, "gsm8k", "test")
    assert (example.task, example.instruction, example.output, example.answer) == (
        "gsm8k",
        "2+2?",
        "2+2=4. The answer is 4",
        "4",
    )
    assert example.template == "alpaca" and example.scoring is None  # the registry scores gsm8k: number


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
