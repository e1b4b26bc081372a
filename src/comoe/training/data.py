"""What a run trains and validates on: the built-in tasks, LLM-Adapters tasks, your files (--data), or a
Python dataset; and a validation set from --eval-data or a seeded split (--val-fraction)."""

from __future__ import annotations

import math
import random
from typing import Any

from comoe.data.example import Example, group_by_task
from comoe.data.selection import sample_per_task, select_examples
from comoe.data.sources import examples_from_records, load_data
from comoe.training.settings import TrainArgs


def training_data(args: TrainArgs, dataset: Any = None) -> tuple[list[Example], list[Example]]:
    """(training examples, validation examples; empty without validation)."""
    validation: list[Example] = []
    if dataset is not None:
        train, validation = dataset_examples(dataset, args)
    else:
        train = select_examples(args, "train", args.train_limit, args.seed)
    if args.eval_data:
        validation = load_data(
            args.eval_data, "validation", args.format, args.template, args.columns, flag="--eval-data"
        )
    elif args.val_fraction:
        train, validation = split_validation(train, args.val_fraction, args.seed)
    return train, validation


def split_validation(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """A seeded, disjoint split: ceil(fraction * n) examples of each task (n >= 2) held out for validation,
    so every task is validated and the split depends on the seed only."""
    held: set[int] = set()
    for task, indices in group_by_task(examples).items():
        if len(indices) < 2:
            continue
        count = min(len(indices) - 1, max(1, math.ceil(fraction * len(indices))))
        held.update(random.Random(f"{seed}:validation:{task}").sample(indices, count))
    if not held:
        raise ValueError(
            f"val_fraction={fraction} leaves no validation examples: no task has two examples to split (each "
            f"task keeps one to train on; {len(examples)} example(s) here); add examples or give --eval-data"
        )
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [e for i, e in enumerate(examples) if i in held]


def dataset_examples(dataset: Any, args: TrainArgs) -> tuple[list[Example], list[Example]]:
    """Examples from a datasets.Dataset, a DatasetDict (its 'train' split; its 'validation' split validates
    unless --eval-data or --val-fraction is given) or a list of record dicts, in any --data format."""
    splits = dataset if hasattr(dataset, "keys") and not isinstance(dataset, list) else {"train": dataset}
    if "train" not in splits:
        raise ValueError(f"dataset: a DatasetDict needs a 'train' split (it has {', '.join(splits)})")

    def examples(split: str) -> list[Example]:
        records = splits[split]
        records = records.to_list() if hasattr(records, "to_list") else list(records)
        return examples_from_records(
            records, f"dataset[{split!r}]", "data", args.format, args.template, args.columns
        )

    train = sample_per_task(examples("train"), args.train_limit, args.seed)
    use_split = "validation" in splits and not (args.eval_data or args.val_fraction)
    return train, examples("validation") if use_split else []
