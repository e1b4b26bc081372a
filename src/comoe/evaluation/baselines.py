"""What an accuracy is worth, task by task: the chance level, the majority-answer baselines (of the evaluated
sample and of the training data), the distribution of predicted answers, for generation the share of empty,
repeated and unparseable responses, and a one-line warning when the predictions collapse.

Everything here reads a report's example rows (dicts with task, answer, predicted, correct, and where the
report has them options, generated, response), so it applies to hand-made and older reports too.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from comoe.data.example import Example
from comoe.evaluation.scoring import wilson_interval

COLLAPSE_SHARE = 0.9  # one predicted answer for at least this share of a task's questions is a collapse
COLLAPSE_MIN_QUESTIONS = 4  # below this many questions a task gets no warning: one answer says nothing
SHOWN_ANSWERS = 10  # the most frequent predicted answers a report lists per task
NO_ANSWER = "(none)"  # the predicted-answer key of responses no answer was found in
LETTER_OPTIONS = 5  # 'letter' tasks (AQuA) answer A-E


def question_id(example: Example) -> str:
    """A short stable id of a test question from its content (task, prompt fields, choices, answer), not
    from the template that renders it: two reports of the same questions carry the same ids, whichever
    adapter (and trained template) they were made with."""
    content = [
        example.task,
        example.instruction,
        example.input,
        [list(turn) for turn in example.messages],
        list(example.choices),
        example.answer,
    ]
    return hashlib.sha1(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]


def task_baselines(rows: list[dict[str, Any]], trained: dict[str, Any] | None = None) -> dict[str, Any]:
    """The baselines and prediction statistics of one task's rows; `trained` is the task's entry of the
    adapter's data record ({'examples': n, 'answers': {answer: count}}), None when unknown."""
    n = len(rows)
    correct = sum(bool(row["correct"]) for row in rows)
    answers = Counter(str(row["answer"]) for row in rows)
    gold, gold_count = answers.most_common(1)[0]
    predicted = Counter(_shown(row["predicted"]) for row in rows)
    options = [row.get("options") or 0 for row in rows]
    chance = sum(1 / k for k in options) / n if all(options) else None
    result: dict[str, Any] = {
        "chance": chance,
        "majority": {"answer": gold, "accuracy": gold_count / n, "ci95": wilson_interval(gold_count, n)},
        "train_majority": None,
        "predicted": dict(predicted.most_common(SHOWN_ANSWERS)),
        "distinct_predicted": len(predicted),
        "generation": generation_quality(rows) if any(row.get("generated") for row in rows) else None,
    }
    if trained and trained.get("answers"):
        answer, count = max(trained["answers"].items(), key=lambda item: item[1])
        result["train_majority"] = {
            "answer": answer,
            "train_share": count / trained["examples"],
            "accuracy": answers[answer] / n,
        }
    result["warning"] = collapse_warning(n, correct, answers, predicted, result["majority"], chance)
    return result


def collapse_warning(
    n: int,
    correct: int,
    answers: Counter[str],
    predicted: Counter[str],
    majority: dict[str, Any],
    chance: float | None,
) -> str | None:
    """One line when one answer is predicted for at least COLLAPSE_SHARE of the questions (and is the gold
    answer of fewer of them), or, for a closed answer set (a chance level), when the accuracy is no better
    than always giving the sample's most frequent answer (at or below the upper end of its 95% interval).
    None for fewer than COLLAPSE_MIN_QUESTIONS questions: one or two answers are no distribution."""
    if n < COLLAPSE_MIN_QUESTIONS:
        return None
    parts = []
    top, count = predicted.most_common(1)[0]
    if count / n >= COLLAPSE_SHARE and answers[top] / n < COLLAPSE_SHARE:
        share = f"{count} of {n} questions ({100 * count / n:.0f}%)"
        parts.append(
            f"no answer found in {share}"
            if top == NO_ANSWER
            else f"predictions collapsed: {top!r} for {share}, the answer to {100 * answers[top] / n:.0f}%"
        )
    low, high = majority["ci95"]
    if chance is not None and correct / n <= high:
        parts.append(
            f"accuracy {100 * correct / n:.1f}% is no better than always answering {majority['answer']!r} "
            f"({100 * majority['accuracy']:.1f}%, 95% CI {100 * low:.1f}-{100 * high:.1f})"
        )
    return "; ".join(parts) or None


def generation_quality(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Shares of generated responses that are empty, repeat themselves (`repeats`) or hold no answer the
    task's extraction finds, and the most frequent answer found."""
    generated = [row for row in rows if row.get("generated")]
    n = len(generated)
    texts = [str(row.get("response") or "") for row in generated]
    found = Counter(str(row["predicted"]) for row in generated if row["predicted"] is not None)
    most = found.most_common(1)
    return {
        "empty": sum(not text.strip() for text in texts) / n,
        "repeated": sum(repeats(text) for text in texts) / n,
        "unparseable": sum(
            row["predicted"] is None and bool(text.strip())
            for row, text in zip(generated, texts, strict=True)
        )
        / n,
        "most_frequent": {"answer": most[0][0], "share": most[0][1] / n} if most else None,
    }


def repeats(text: str, longest: int = 10) -> bool:
    """Whether a response loops: a run of 1-`longest` words said three times in a row, covering at least six
    words ('The answer is 5. The answer is 5. The answer is 5.', '10 10 10 10 10 10')."""
    words = text.split()
    for size in range(1, longest + 1):
        if 3 * size < 6:
            continue
        for start in range(len(words) - 3 * size + 1):
            unit = words[start : start + size]
            if unit == words[start + size : start + 2 * size] == words[start + 2 * size : start + 3 * size]:
                return True
    return False


def add_baselines(report: dict[str, Any], trained: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Add each task's baselines (task_baselines) to report['tasks'] from report['examples'], and the
    report's warnings ('task: ...', one line each) as report['warnings']; returns the warnings. `trained`
    is trained_answers of the adapter folder ({} or None: no training record)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in report.get("examples", []):
        groups.setdefault(row["task"], []).append(row)
    warnings = []
    for task, rows in groups.items():
        baselines = task_baselines(rows, (trained or {}).get(task))
        report["tasks"].setdefault(task, {}).update(baselines)
        if baselines["warning"]:
            warnings.append(f"{task}: {baselines['warning']}")
    report["warnings"] = warnings
    return warnings


def _shown(predicted: Any) -> str:
    return NO_ANSWER if predicted is None else str(predicted)
