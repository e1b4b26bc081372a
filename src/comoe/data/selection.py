"""Which examples a command uses: the one entry point (`select_examples`) that training, evaluation and
analysis share, choosing from --data files, the LLM-Adapters tasks (--data-dir/--tasks) or the built-in
tasks, with at most `limit` examples per task in a seeded sample."""

from __future__ import annotations

import os
import random
from typing import Protocol

from comoe.data.builtin import builtin_examples
from comoe.data.example import Example, group_by_task
from comoe.data.llm_adapters import load_task
from comoe.data.sources import load_data
from comoe.data.tasks import TASKS
from comoe.validation import check_int


class SourceSettings(Protocol):
    """The settings that say where examples come from (comoe.settings.DataArgs and --data-dir/--tasks:
    TrainArgs, EvalArgs, AnalyzeArgs)."""

    data: list[str] | None
    format: str
    template: str
    columns: dict[str, str]
    data_dir: str | None
    tasks: list[str] | None


def select_examples(
    source: SourceSettings, split: str, limit: int | None, seed: int, auto_template: str | None = None
) -> list[Example]:
    """The examples of `split`: from --data files (a datasets folder's `split`; their records in --format,
    prompted with --template, under 'auto' with `auto_template` where the records accept it), else from
    the LLM-Adapters tasks of --data-dir, else from the built-in tasks; at most `limit` per task (a seeded
    sample, the same for every method and run)."""
    if not source.data:
        return load_examples(source.data_dir, source.tasks, split, limit, seed)
    examples = load_data(
        source.data, split, source.format, source.template, source.columns, auto_template=auto_template
    )
    return sample_per_task(examples, limit, seed)


def load_examples(
    data_dir: str | os.PathLike | None, tasks: list[str] | None, split: str, limit: int | None, seed: int = 0
) -> list[Example]:
    """A multi-task mixture: up to `limit` examples per task (a seeded sample), each tagged with its task.

    Without a data directory the built-in reasoning-gym tasks are used (`limit` defaults to 200 there).
    """
    if limit is not None:
        check_int("limit", limit, low=1)
    for name in tasks or []:
        if name in TASKS and split not in TASKS[name].splits:
            raise ValueError(f"tasks: {name!r} has no {split} split ({', '.join(TASKS[name].splits)} only)")
    if data_dir is None:
        return builtin_examples(split, per_task=limit or 200, tasks=tasks)
    if not tasks:
        raise ValueError("tasks: name at least one task to load from --data-dir")
    mixture = []
    for task in tasks:
        mixture += sample_per_task(load_task(data_dir, task, split), limit, seed)
    return mixture


def sample_per_task(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most `limit` examples of each task: a seeded sample per task (the same for every method and
    run), tasks in order of first appearance."""
    if limit is None:
        return examples
    chosen = []
    for task, indices in group_by_task(examples).items():
        of_task = [examples[i] for i in indices]
        if len(of_task) > limit:
            of_task = random.Random(f"{seed}:{task}").sample(of_task, limit)
        chosen += of_task
    return chosen
