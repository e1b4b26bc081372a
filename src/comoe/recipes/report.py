"""report.md of a run: settings, the training curve, and per-task accuracy before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from comoe.files import atomic_write_text

REPORT_NAME = "report.md"  # in the run directory


def training_curve(run: Path, points: int = 10) -> list[dict[str, Any]]:
    """About `points` evenly spaced rows of log.jsonl (always the first and the last step)."""
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        return []
    stride = max(1, len(rows) // points)
    picked = rows[::stride]
    if picked[-1] is not rows[-1]:
        picked.append(rows[-1])
    return picked


def _percent(row: dict[str, Any]) -> str:
    low, high = row["ci95"]
    return f"{100 * row['accuracy']:.1f} ({100 * low:.0f}–{100 * high:.0f})"


def _baseline(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _majority(majority: dict[str, Any] | None) -> str:
    """The sample's majority-answer baseline: accuracy of always giving its most common answer."""
    if not majority:
        return "-"
    answer = str(majority["answer"])
    answer = answer if len(answer) <= 24 else answer[:21] + "..."
    return f"{100 * majority['accuracy']:.1f} ({answer.strip()})"


def write_report(run: Path, base: dict[str, Any], tuned: dict[str, Any]) -> Path:
    settings = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    lines = [
        f"# comoe run: {run.name}",
        "",
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(settings).strip(),
        "```",
        "",
    ]
    lines += [
        "## Training curve",
        "",
        "| step | task loss | balance | contrastive | lr | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in training_curve(run):
        lines.append(
            f"| {row['step']} | {row['task']:.4f} | {row['balance']:.4f} | {row['contrastive']:.4f} | "
            f"{row['lr']:.2e} | {row['tokens_per_s']:.0f} |"
        )
    lines += ["", f"## Accuracy per task (%, 95% Wilson CI; mode: {tuned['mode']})", ""]
    lines += [
        "| task | n | chance | majority answer | base model | fine-tuned | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in tuned["tasks"].items():
        before = base["tasks"][name]
        change = 100 * (row["accuracy"] - before["accuracy"])
        lines.append(
            f"| {name} | {row['n']} | {_baseline(row.get('chance'))} | {_majority(row.get('majority'))} | "
            f"{_percent(before)} | {_percent(row)} | {change:+.1f} |"
        )
    change = 100 * (tuned["average"] - base["average"])
    lines.append(
        f"| **average** | | | | {100 * base['average']:.1f} | {100 * tuned['average']:.1f} | {change:+.1f} |"
    )
    warned = [f"- base model: {w}" for w in base.get("warnings", [])]
    warned += [f"- fine-tuned: {w}" for w in tuned.get("warnings", [])]
    if warned:
        lines += ["", "**Warnings** (docs/evaluation.md says what they mean):", "", *warned]
    saved = ", `checkpoints/`" if (run / "checkpoints").is_dir() else ""  # none when max_steps < save_steps
    lines += [
        "",
        f"Files: `config.yaml` (resolved settings), `adapter/`, `log.jsonl`, `tensorboard/`{saved},",
        "`eval.json` (both evaluations with every prediction).",
        "",
    ]
    path = run / REPORT_NAME
    atomic_write_text(path, "\n".join(lines))
    return path


def accuracy_table(report: Path) -> str:
    """The per-task accuracy table of a report.md (what `comoe demo` shows at the end)."""
    return report.read_text(encoding="utf-8").split("## Accuracy", 1)[1].split("\n", 1)[1]
