"""Examples: the LLM-Adapters benchmark files, multi-task mixtures, and built-in data (reasoning-gym)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    """One instruction example in the LLM-Adapters layout, tagged with its task (analysis needs it)."""

    task: str
    instruction: str
    input: str
    output: str  # the training target
    answer: str  # the gold answer evaluation compares against


# Five clearly different skills, so a router has something to specialise on: arithmetic, string
# manipulation, counting, relational reasoning and logic. Generator name and its settings.
BUILTIN_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "chain_sum": ("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
    "spell_backward": ("spell_backward", dict(min_word_len=3, max_word_len=6)),
    "letter_counting": ("letter_counting", dict(min_words=3, max_words=6)),
    "family_relationships": ("family_relationships", dict(min_family_size=3, max_family_size=5)),
    "syllogism": ("syllogism", {}),
}
# reasoning-gym seeds item i with seed + i, so the splits use seeds far apart.
_SPLIT_SEEDS = {"train": 1, "test": 10_000_000}


def builtin_examples(split: str, per_task: int, tasks: list[str] | None = None) -> list[Example]:
    """`per_task` examples of each built-in task; the same call always returns the same examples.

    Train and test come from different seeds, and test questions that also occur in train are skipped,
    so the split is fixed and disjoint.
    """
    import reasoning_gym

    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split={split!r} is invalid: expected 'train' or 'test'")
    names = tasks or list(BUILTIN_TASKS)
    unknown = [name for name in names if name not in BUILTIN_TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown built-in tasks {unknown}; valid: {', '.join(BUILTIN_TASKS)}")
    examples = []
    for name in names:
        generator, settings = BUILTIN_TASKS[name]
        seen = set()
        if split == "test":
            train = reasoning_gym.create_dataset(
                generator, size=4 * per_task, seed=_SPLIT_SEEDS["train"], **settings
            )
            seen = {item["question"] for item in train}
        pool = reasoning_gym.create_dataset(
            generator, size=4 * per_task, seed=_SPLIT_SEEDS[split], **settings
        )
        chosen = [item for item in pool if item["question"] not in seen][:per_task]
        examples += [Example(name, item["question"], "", item["answer"], item["answer"]) for item in chosen]
    return examples


# ---- LLM-Adapters benchmark files ---------------------------------------------------------------------

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


def answer_kind(task: str) -> str:
    """How a task's answers are scored: 'choice' (an option word), 'number', 'letter' (AQuA) or 'exact'."""
    if task in COMMONSENSE_TASKS:
        return "choice"
    if task == "AQuA":
        return "letter"
    if task in MATH_TASKS or task == MATH_TRAIN:
        return "number"
    return "exact"


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
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task {task!r} has no {split} split in this data directory")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON ({error})") from None
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
        examples.append(
            Example(
                task,
                str(record["instruction"]),
                str(record.get("input") or ""),
                str(record["output"]),
                str(record["answer"]),
            )
        )
    return examples


def load_examples(
    data_dir: str | os.PathLike | None, tasks: list[str] | None, split: str, limit: int | None, seed: int = 0
) -> list[Example]:
    """A multi-task mixture: up to `limit` examples per task (a seeded sample), each tagged with its task.

    Without a data directory the built-in reasoning-gym tasks are used (`limit` defaults to 200 there).
    """
    if data_dir is None:
        return builtin_examples(split, per_task=limit or 200, tasks=tasks)
    if not tasks:
        raise ValueError("tasks: name at least one task to load from --data-dir")
    mixture = []
    for task in tasks:
        examples = load_task(data_dir, task, split)
        if limit is not None and len(examples) > limit:
            examples = random.Random(f"{seed}:{task}").sample(examples, limit)
        mixture += examples
    return mixture
