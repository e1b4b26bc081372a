"""The task registry: for every built-in and LLM-Adapters task name, where its examples come from, which
splits it has and how its answers are scored. Evaluation asks an example how it is scored (`scoring_of`):
your own data carries its scoring on its examples, so the registry holds only these named tasks and never
changes while a command runs (`register_task` is there for a new named source)."""

from __future__ import annotations

from dataclasses import dataclass

from comoe.data.builtin import BUILTIN_TASKS
from comoe.data.example import Example
from comoe.data.llm_adapters import COMMONSENSE_TASKS, MATH_TASKS, MATH_TRAIN
from comoe.validation import check_choice

SCORINGS = ("choice", "number", "letter", "exact")


@dataclass(frozen=True)
class Task:
    """A named task. scoring: 'choice' (an option word, scored by option log-likelihood or generation),
    'number' (the last number, |error| <= 1e-3), 'letter' (A-E) or 'exact' (the first line, case-folded)."""

    name: str
    source: str  # "builtin" (reasoning-gym) or "llm-adapters" (a --data-dir task folder)
    scoring: str = "exact"
    splits: tuple[str, ...] = ("train", "test")

    def __post_init__(self) -> None:
        check_choice(f"task {self.name!r} scoring", self.scoring, SCORINGS)


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
    """How a named task's answers are scored: 'choice', 'number', 'letter' (AQuA) or 'exact'."""
    return get_task(task).scoring


def scoring_of(example: Example) -> str:
    """How an example's answer is scored: its own scoring (your data), else its task's."""
    return example.scoring or answer_kind(example.task)
