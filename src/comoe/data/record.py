"""The data record of an adapter folder (comoe_data.json): which tasks it was trained on, how many examples
of each, and with which template, so that `comoe generate` and `comoe eval --data` prompt as training did;
the most frequent answers of each task, so that `comoe eval` can show the training data's majority-answer
baseline (folders written before it read as unknown); and whether the base was quantized (`quantization`:
'4bit' or '8bit', absent for a full-precision base), so that they load the base the same way."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from comoe.data.example import Example
from comoe.files import atomic_write_text

DATA_RECORD = "comoe_data.json"
RECORDED_ANSWERS = 20  # the most frequent answers of each task kept in the record (with their counts)


def write_data_record(folder: Path, examples: list[Example], quantization: str | None = None) -> None:
    """`comoe_data.json` in an adapter folder: each training task's example count and template (that of
    its first example), the template (when all examples share one) that `comoe generate` and `comoe
    eval --data` then prompt with, the RECORDED_ANSWERS most frequent answers of each task with their counts
    and the number of distinct answers, and the base's quantization when it had one."""
    counts = Counter(e.task for e in examples)
    answers: dict[str, Counter[str]] = {}
    for example in examples:
        answers.setdefault(example.task, Counter())[example.answer] += 1
    templates: dict[str, str] = {}
    for example in examples:
        templates.setdefault(example.task, example.template)
    shared = {example.template for example in examples}
    record = {
        "template": shared.pop() if len(shared) == 1 else None,
        "tasks": {
            task: {
                "examples": n,
                "template": templates[task],
                "answers": dict(answers[task].most_common(RECORDED_ANSWERS)),
                "distinct_answers": len(answers[task]),
            }
            for task, n in counts.items()
        },
    }
    if quantization is not None:
        record["quantization"] = quantization
    atomic_write_text(folder / DATA_RECORD, json.dumps(record, indent=2) + "\n")


def trained_template(adapter: str | Path | None) -> str | None:
    """The template an adapter folder was trained with (None: unknown, or several)."""
    return _recorded(adapter, "template")


def trained_answers(adapter: str | Path | None) -> dict[str, dict[str, Any]]:
    """Per training task of an adapter folder, {'examples': n, 'answers': {answer: count}} (the most frequent
    answers); tasks of a record written before answers were recorded, and folders without a record, are
    left out."""
    tasks = _recorded(adapter, "tasks")
    if not isinstance(tasks, dict):
        return {}
    return {
        task: {"examples": row["examples"], "answers": row["answers"]}
        for task, row in tasks.items()
        if isinstance(row, dict) and isinstance(row.get("answers"), dict) and row.get("examples")
    }


def trained_quantization(adapter: str | Path | None) -> str | None:
    """The quantization of the base an adapter folder was trained on ('4bit', '8bit'; None: full precision
    or not recorded)."""
    value = _recorded(adapter, "quantization")
    if value not in (None, "4bit", "8bit"):
        raise ValueError(
            f"{Path(adapter or '') / DATA_RECORD}: quantization={value!r} is invalid: "
            "expected '4bit', '8bit' or none"
        )
    return value


def _recorded(adapter: str | os.PathLike | None, key: str) -> Any:
    """One field of an adapter folder's data record (None without a record or the field). The record is
    read once per version of the file, however many fields one load asks for."""
    path = Path(adapter) / DATA_RECORD if adapter else None
    if path is None or not path.is_file():
        return None
    stat = path.stat()
    return _read_record(str(path), stat.st_mtime_ns, stat.st_size).get(key)


@functools.lru_cache(maxsize=16)
def _read_record(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """The record at `path` as of (mtime, size): a changed file is read again."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError:
        values = None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: not a valid comoe data record (JSON object expected)")
    return values
