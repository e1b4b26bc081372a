"""Example: one training or test example, tagged with its task (per-task metrics and analysis group by it),
carrying the template that renders it and, for your own data, how its answer is scored."""

from __future__ import annotations

from dataclasses import dataclass

from comoe.data.templates import TEMPLATE_NAMES
from comoe.validation import check_choice


@dataclass(frozen=True)
class Example:
    """One example in the LLM-Adapters layout, optionally a whole conversation or a multiple-choice item.

    `messages` ((role, content) pairs) holds a conversation when `template` is 'chat': training learns every
    assistant turn, and the prompt of evaluation is everything before the last assistant turn (whose
    content is then `output`). `choices` lists the options of a multiple-choice item whose `answer` is one
    of them (user data; LLM-Adapters items name their options in an 'Answer format:' line instead).

    `template` names the prompt template that renders the example (comoe.data.templates: 'alpaca', 'none',
    or 'chat'); the built-in and LLM-Adapters tasks use Alpaca. `scoring` is how its answer is scored
    ('choice', 'number', 'letter' or 'exact'); None means as its task is registered in comoe.data.tasks
    (the built-in and LLM-Adapters tasks), else by exact match. Your own data sets both from its records.
    """

    task: str
    instruction: str
    input: str
    output: str  # the training target
    answer: str  # the gold answer evaluation compares against
    messages: tuple[tuple[str, str], ...] = ()
    choices: tuple[str, ...] = ()
    template: str = "alpaca"
    scoring: str | None = None

    def __post_init__(self) -> None:
        check_choice(f"task {self.task!r} template", self.template, TEMPLATE_NAMES)


def group_by_task(examples: list[Example]) -> dict[str, list[int]]:
    """Each task's example indices, tasks in order of first appearance (one pass)."""
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(example.task, []).append(index)
    return groups


def vocabulary_ids(examples: list[Example], vocabulary: list[str]) -> list[int]:
    """Each example's task id in `vocabulary` (an adapter's task names, a task's id its position), -1 for a
    task outside it."""
    position = {name: index for index, name in enumerate(vocabulary)}
    return [position.get(e.task, -1) for e in examples]


def task_index(examples: list[Example]) -> tuple[list[str], list[int]]:
    """The distinct task names in order of first appearance, and each example's index into them."""
    names = list(dict.fromkeys(e.task for e in examples))
    position = {name: index for index, name in enumerate(names)}
    return names, [position[e.task] for e in examples]
