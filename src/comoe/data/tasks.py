"""The task registry: for every task name, where its examples come from, its prompt template and how its
answers are scored. Training, evaluation and analysis look tasks up here instead of keeping their own
name lists, so a new data source registers its tasks once (`register_task`) and is scored correctly."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from comoe.data.builtin import BUILTIN_TASKS, builtin_examples
from comoe.data.chat import Segments, chat_prompt, chat_segments
from comoe.data.example import Example
from comoe.data.llm_adapters import COMMONSENSE_TASKS, MATH_TASKS, MATH_TRAIN, load_task
from comoe.data.templates import TEMPLATE_NAMES, TEMPLATES
from comoe.validation import check_choice, check_int

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SCORINGS = ("choice", "number", "letter", "exact")


@dataclass(frozen=True)
class Task:
    """A named task. scoring: 'choice' (an option word, scored by option log-likelihood or generation),
    'number' (the last number, |error| <= 1e-3), 'letter' (A-E) or 'exact' (the first line, case-folded)."""

    name: str
    source: str  # "builtin" (reasoning-gym), "llm-adapters" (a --data-dir task folder) or "file" (--data)
    scoring: str = "exact"
    template: str = "alpaca"
    splits: tuple[str, ...] = ("train", "test")

    def __post_init__(self) -> None:
        check_choice(f"task {self.name!r} scoring", self.scoring, SCORINGS)
        check_choice(f"task {self.name!r} template", self.template, TEMPLATE_NAMES)


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add (or replace) a task in the registry; returns it."""
    TASKS[task.name] = task
    return task


for _name in BUILTIN_TASKS:
    register_task(Task(_name, "builtin", "exact", splits=("train", "validation", "test")))
for _name in COMMONSENSE_TASKS:
    register_task(Task(_name, "llm-adapters", "choice"))
for _name in MATH_TASKS:
    register_task(Task(_name, "llm-adapters", "letter" if _name == "AQuA" else "number"))
register_task(Task(MATH_TRAIN, "llm-adapters", "number", splits=("train",)))  # a training mix, no test split


def get_task(name: str) -> Task:
    """The registered task, or an unregistered one scored by exact match."""
    return TASKS.get(name) or Task(name, "unknown")


def answer_kind(task: str) -> str:
    """How a task's answers are scored: 'choice', 'number', 'letter' (AQuA) or 'exact'."""
    return get_task(task).scoring


def render_prompt(example: Example, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The prompt text of an example, in its task's template (the 'chat' template needs the tokenizer)."""
    template = get_task(example.task).template
    if template == "chat":
        if tokenizer is None:
            raise ValueError(f"task {example.task!r} uses the chat template: its prompts need the tokenizer")
        return chat_prompt(tokenizer, example.messages)
    return TEMPLATES[template](example.instruction, example.input)


def training_segments(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[Segments, bool]:
    """What an example trains on, as (text, learned) spans, and whether eos follows (text templates: the
    prompt, then the output; conversations: every assistant turn learned, ending with the template's own
    end-of-turn marker, so no eos is added)."""
    if get_task(example.task).template == "chat":
        return chat_segments(tokenizer, example.messages), False
    return [(render_prompt(example), False), (example.output, True)], True


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


def group_by_task(examples: list[Example]) -> dict[str, list[int]]:
    """Each task's example indices, tasks in order of first appearance (one pass)."""
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.task, []).append(index)
    return groups


def task_index(examples: list[Example]) -> tuple[list[str], list[int]]:
    """The distinct task names in order of first appearance, and each example's index into them."""
    names = list(dict.fromkeys(e.task for e in examples))
    position = {name: index for index, name in enumerate(names)}
    return names, [position[e.task] for e in examples]
