"""The data record of an adapter folder (comoe_data.json): which tasks it was trained on, how many examples
of each, and with which template, so that `comoe generate` and `comoe eval --data` prompt as training did."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from comoe.data.example import Example
from comoe.files import atomic_write_text

DATA_RECORD = "comoe_data.json"


def write_data_record(folder: Path, examples: list[Example]) -> None:
    """`comoe_data.json` in an adapter folder: each training task's example count and template (that of
    its first example), and the template (when all examples share one) that `comoe generate` and `comoe
    eval --data` then prompt with."""
    counts = Counter(e.task for e in examples)
    templates: dict[str, str] = {}
    for example in examples:
        templates.setdefault(example.task, example.template)
    shared = {example.template for example in examples}
    record = {
        "template": shared.pop() if len(shared) == 1 else None,
        "tasks": {task: {"examples": n, "template": templates[task]} for task, n in counts.items()},
    }
    atomic_write_text(folder / DATA_RECORD, json.dumps(record, indent=2) + "\n")


def trained_template(adapter: str | Path | None) -> str | None:
    """The template an adapter folder was trained with (None: unknown, or several)."""
    path = Path(adapter) / DATA_RECORD if adapter else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("template")
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: not a valid comoe data record (JSON object expected)") from None
