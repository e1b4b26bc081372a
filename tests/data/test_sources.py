"""Your own data from files (--data): every file type reads the same records, columns are renamed, names
and task fields decide the task, each source's answers decide its scoring, and each kind of bad input is
one line naming the file, record and field."""

import json

import datasets
import pytest

from comoe.data import TASKS
from comoe.data.sources import DataSpec, examples_from_records, load_data, read_records
from tests.helpers import one_line_error, write_jsonl


def test_columns_are_renamed_and_task_fields_and_names_decide_the_task(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "q1", "response": "r1", "task": "alpha"}, {"question": "q2", "response": "r2"}],
    )
    examples = load_data([str(path)], columns={"instruction": "question", "output": "response"})
    assert [(e.task, e.instruction, e.output) for e in examples] == [
        ("alpha", "q1", "r1"),
        ("qa", "q2", "r2"),
    ]
    named = load_data([f"mine={path}"], columns={"instruction": "question", "output": "response"})
    assert {e.task for e in named} == {"mine"}
    assert DataSpec.parse("a=b=c.jsonl") == DataSpec(path=type(path)("b=c.jsonl"), name="a")
    assert DataSpec.parse("/x/a=b.jsonl").name is None


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "csv", "dataset", "datasetdict"])
def test_every_file_type_reads_the_same_records(tmp_path, kind):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    table = datasets.Dataset.from_list(rows)
    path = tmp_path / f"data.{kind}"
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "parquet":
        table.to_parquet(str(path))
    elif kind == "csv":
        table.to_csv(str(path), index=False)
    elif kind == "dataset":
        table.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(path))
        assert read_records(path, "test") == rows[:1]
    assert read_records(path) == rows


def test_scoring_is_chosen_from_the_answers():
    items = [
        ({"prompt": "p", "answer": "yes", "choices": ["yes", "no"]}, "choice"),
        (
            {"instruction": "Sky blue?\n\nAnswer format: true/false", "answer": "true"},
            "choice",
        ),  # LLM-Adapters
        ({"prompt": "p", "completion": "12.5"}, "number"),
        ({"prompt": "p", "completion": "a cat"}, "exact"),
    ]
    for record, scoring in items:
        (example,) = examples_from_records([record], "test", f"task-{scoring}")
        assert example.scoring == scoring
    assert not any(name.startswith("task-") for name in TASKS)  # carried on the examples, not registered


def test_each_source_keeps_its_own_template_and_scoring(tmp_path):
    """Two files with a task of the same name: neither changes how the other's examples are prompted or
    scored (no registry entry is replaced), and a task named like a built-in one keeps its records' scoring."""
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"prompt": "1+1?", "completion": "2"}])
    words = write_jsonl(tmp_path / "words.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
    first, second = load_data([f"boolq={numbers}", f"boolq={words}"])
    assert (first.template, first.scoring) == ("none", "number")
    assert (second.template, second.scoring) == ("alpaca", "exact")
    assert TASKS["boolq"].scoring == "choice"


def test_the_format_and_template_are_checked_before_any_record():
    with pytest.raises(ValueError, match="format='csv' is invalid: expected auto or one of instruction, "):
        examples_from_records([{"prompt": "p", "completion": "c"}], "test", "t", fmt="csv")
    with pytest.raises(ValueError, match="template='jinja' is invalid: expected auto or one of alpaca"):
        examples_from_records([{"prompt": "p", "completion": "c"}], "test", "t", template="jinja")
    with pytest.raises(ValueError, match="record 0 is a prompt_completion record but --format says messages"):
        examples_from_records([{"prompt": "p", "completion": "c"}], "test", "t", fmt="messages")
    with pytest.raises(ValueError, match="test: no records"):
        examples_from_records([], "test", "t")


BAD_INPUTS = [
    ("missing.jsonl", None, "no such file or folder"),
    ("data.txt", "hello\n", "unknown file type '.txt'"),
    ("data.jsonl", '{"text": "x"}\n', "record 0: no known format (fields: text)"),
    ("data.jsonl", '{"prompt": "x", "completion": "  "}\n', "record 0: field 'completion' is empty"),
    (
        "data.jsonl",
        '{"prompt": "x", "completion": "y"}\n{"instruction": "x", "output": "y"}\n',
        "record 1 is a instruction record but record 0 says prompt_completion",
    ),
    (
        "data.jsonl",
        '{"messages": [{"role": "user", "content": "hi"}]}\n',
        "record 0: the conversation has no assistant turn",
    ),
    ("data.jsonl", '{"prompt": "x", "completion": "\xff"}\n', "line 1 is not valid UTF-8"),
    (
        "data.jsonl",
        '{"prompt": "x", "completion": 5}\n',
        "record 0: field 'completion' must be a string, got int",
    ),
    (
        "data.jsonl",
        '{"messages": [{"role": "robot", "content": "hi"}]}\n',
        "record 0: messages[0]: role 'robot' is invalid",
    ),
    (
        "data.jsonl",
        '{"prompt": "x", "answer": "z", "choices": ["a", "b"]}\n',
        "'z' is not one of its choices",
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_record_and_field(capsys, tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode("latin-1") if "\xff" in content else content.encode())
    message = one_line_error(capsys, ["train", "--data", str(path), "--output", str(tmp_path / "run")])
    assert expected in message and str(path) in message
    assert not (tmp_path / "run").exists()  # refused before the model loads or the run folder is made
