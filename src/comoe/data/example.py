"""Example: one instruction example, tagged with its task (per-task metrics and analysis group by it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction example in the LLM-Adapters layout."""

    task: str
    instruction: str
    input: str
    output: str  # the training target
    answer: str  # the gold answer evaluation compares against
