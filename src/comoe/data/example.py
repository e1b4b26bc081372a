"""Example: one training or test example, tagged with its task (per-task metrics and analysis group by it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One example in the LLM-Adapters layout, optionally a whole conversation or a multiple-choice item.

    `messages` ((role, content) pairs) holds a conversation when the task's template is 'chat': training
    learns every assistant turn, and the prompt of evaluation is everything before the last assistant turn
    (whose content is then `output`). `choices` lists the options of a multiple-choice item whose `answer`
    is one of them (user data; LLM-Adapters items name their options in an 'Answer format:' line instead).
    """

    task: str
    instruction: str
    input: str
    output: str  # the training target
    answer: str  # the gold answer evaluation compares against
    messages: tuple[tuple[str, str], ...] = ()
    choices: tuple[str, ...] = ()
