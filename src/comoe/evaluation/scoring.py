"""Scoring as LLM-Adapters does it: which answer a response commits to, whether it is right, and per-task
accuracy with a 95% Wilson interval."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from comoe.data.example import Example
from comoe.data.formats import answer_format_options

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
NUMBER_TOLERANCE = 1e-3  # LLM-Adapters counts |prediction - answer| <= 0.001 as correct


def choice_options(example: Example) -> list[str]:
    """The options of a multiple-choice example: its `choices` (user data), else the option words of its
    'Answer format: a/b/c' line (LLM-Adapters commonsense)."""
    if example.choices:
        return list(example.choices)
    options = answer_format_options(example.instruction)
    if options is None:
        raise ValueError(f"{example.task}: example has no 'Answer format:' line to read options from")
    return options


def choice_response(option: str) -> str:
    return f"the correct answer is {option}"


def option_response(example: Example, option: str) -> str:
    """The response whose likelihood scores an option: the option itself for items with explicit choices
    (as lm-eval scores them); LLM-Adapters' trained phrasing 'the correct answer is X' otherwise."""
    return option if example.choices else choice_response(option)


def extract_answer(kind: str, text: str, options: list[str] | None = None) -> str | None:
    """The answer a generated text commits to, or None.

    choice: the first option word mentioned (as LLM-Adapters); number: the last number (commas dropped);
    letter: the letter in 'answer is (X)' if present, else the last standalone A-E; exact: the first line.
    """
    if kind == "choice":
        words = [option for option in options or [] if option]
        if not words:  # an empty pattern would match the empty string
            return None
        found = re.findall("|".join(sorted(map(re.escape, words), key=len, reverse=True)), text)
        return found[0] if found else None
    if kind == "number":
        found = _NUMBER.findall(text.replace(",", ""))
        return found[-1] if found else None
    if kind == "letter":
        stated = re.findall(r"answer is \(?([A-E])\)?", text)
        found = stated or re.findall(r"\b([A-E])\b", text)
        return found[-1] if found else None
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else None


def is_correct(kind: str, predicted: str | None, answer: str) -> bool:
    if predicted is None:
        return False
    if kind == "number":
        try:
            return abs(float(predicted) - float(answer)) <= NUMBER_TOLERANCE
        except ValueError:
            return False
    if kind == "exact":
        return normalise(predicted) == normalise(answer)
    return predicted == answer


def normalise(text: str) -> str:
    """Exact-match normalisation: case-folded, whitespace collapsed, trailing full stop dropped."""
    return " ".join(text.split()).rstrip(".").casefold()


def wilson_interval(correct: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for an accuracy: sensible at small n and near 0 or 1."""
    if n == 0:
        return [0.0, 0.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


@dataclass
class Prediction:
    task: str
    answer: str
    predicted: str | None
    correct: bool
    response: str = ""
    truncated: bool = False  # the prompt was shortened (from its start) to fit the model's context
    question: str = ""  # the question's id (baselines.question_id): what `comoe compare` pairs reports by
    options: int = 0  # the number of options of a closed answer set (choice, letter), else 0
    generated: bool = False  # answered by generation (`response`), not by option log-likelihood


def summarise(predictions: list[Prediction]) -> dict[str, Any]:
    tasks: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(p.task for p in predictions):
        rows = [p for p in predictions if p.task == name]
        correct = sum(p.correct for p in rows)
        tasks[name] = {
            "accuracy": correct / len(rows),
            "n": len(rows),
            "ci95": wilson_interval(correct, len(rows)),
            "truncated": sum(p.truncated for p in rows),
        }
    average = sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else 0.0
    return {"tasks": tasks, "average": average}
