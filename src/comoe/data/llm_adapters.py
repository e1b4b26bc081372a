"""The LLM-Adapters benchmark files: commonsense and math task folders with train/test JSON splits."""

from __future__ import annotations

import os
from pathlib import Path

from comoe.data.example import Example
from comoe.files import read_json

COMMONSENSE_TASKS = [
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Easy",
    "ARC-Challenge",
    "openbookqa",
]
MATH_TASKS = ["gsm8k", "AddSub", "MultiArith", "SingleEq", "SVAMP", "AQuA", "mawps"]
MATH_TRAIN = "math_data"  # ft-training_set/math_data.json: the math training mix (with rationales)


def resolve_data_dir(data_dir: str | os.PathLike) -> Path:
    """The folder holding the task folders: an LLM-Adapters checkout (with dataset/) or its dataset/."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root}: no such directory")
    if (root / "dataset").is_dir():
        return root / "dataset"
    return root


def task_file(data_dir: str | os.PathLike, task: str, split: str) -> Path:
    dataset = resolve_data_dir(data_dir)
    if task == MATH_TRAIN:
        return dataset.parent / "ft-training_set" / "math_data.json"
    known = COMMONSENSE_TASKS + MATH_TASKS + [MATH_TRAIN]
    if task not in known:
        raise ValueError(f"tasks: unknown task {task!r}; LLM-Adapters tasks: {', '.join(known)}")
    return dataset / task / f"{split}.json"


def load_task(data_dir: str | os.PathLike, task: str, split: str) -> list[Example]:
    """All examples of one LLM-Adapters task split, validated field by field."""
    path = task_file(data_dir, task, split)
    records = read_json(path, f"task {task!r} has no {split} split in this data directory")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of examples")
    examples = []
    for index, record in enumerate(records):
        missing = [
            key
            for key in ("instruction", "output", "answer")
            if not isinstance(record, dict) or key not in record
        ]
        if missing:
            raise ValueError(f"{path}: example {index} lacks field(s) {missing}")
        for key in ("instruction", "input", "output", "answer"):
            value = record.get(key, "")
            if not isinstance(value, str):  # never train on "None", "{'x': 1}" or "nan"
                raise ValueError(
                    f"{path}: example {index} field {key!r} must be a string, got {type(value).__name__} "
                    f"{value!r:.60}"
                )
        examples.append(
            Example(task, record["instruction"], record.get("input", ""), record["output"], record["answer"])
        )
    return examples
