"""The markdown summary of one or more eval reports of the same questions, written next to the report JSON:
accuracy per task with its 95% interval beside the chance level and the majority-answer baselines, the
predicted answers, the warnings, the paired comparison, and a plot with one panel per task (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from comoe.evaluation.compare import comparison_markdown  # noqa: E402
from comoe.files import atomic_write_text  # noqa: E402


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def accuracy_cell(row: dict[str, Any]) -> str:
    low, high = row["ci95"]
    return f"{100 * row['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def predicted_cell(row: dict[str, Any], shown: int = 3) -> str:
    """The most frequent predicted answers with their shares, e.g. "'answer2' 96%, 'answer1' 4%"."""
    counts = row.get("predicted") or {}
    total = row["n"]
    cells = [f"{answer!r} {100 * count / total:.0f}%" for answer, count in list(counts.items())[:shown]]
    more = row.get("distinct_predicted", len(counts)) - len(cells)
    return ", ".join(cells) + (f" (+{more} more)" if more > 0 else "")


def generation_cell(row: dict[str, Any]) -> str:
    quality = row.get("generation")
    if not quality:
        return "-"
    most = quality["most_frequent"]
    frequent = f"{most['answer']!r} {100 * most['share']:.0f}%" if most else "-"
    return (
        f"{100 * quality['empty']:.0f}% / {100 * quality['repeated']:.0f}% / "
        f"{100 * quality['unparseable']:.0f}% / {frequent}"
    )


def train_majority_cell(row: dict[str, Any]) -> str:
    majority = row.get("train_majority")
    if not majority:
        return "unknown"
    return (
        f"{percent(majority['accuracy'])} ({majority['answer']!r}, "
        f"{100 * majority['train_share']:.0f}% of training)"
    )


def summary_markdown(
    reports: list[dict[str, Any]], labels: list[str], comparison: dict[str, Any] | None, plot: str | None
) -> str:
    """The summary of reports of the same questions (one per label)."""
    first = reports[0]
    questions = sum(row["n"] for row in first["tasks"].values())
    lines = [
        f"# Evaluation: {', '.join(labels)}",
        "",
        f"Base model {first.get('model')}; mode {first.get('mode')}; {questions} "
        f"questions ({len(first['tasks'])} tasks; limit {first.get('limit')}, seed {first.get('seed')}).",
        "",
        "## Accuracy per task",
        "",
        "%, with its 95% Wilson interval. Chance: 1 / options (closed answer sets). Majority: always giving "
        "the most frequent answer of this sample (an upper bound for any constant answer here).",
        "",
        "| task | n | chance | majority | " + " | ".join(labels) + " |",
        "|---" * (4 + len(labels)) + "|",
    ]
    for task, row in first["tasks"].items():
        majority = row.get("majority")
        cells = [
            task,
            str(row["n"]),
            percent(row.get("chance")),
            f"{percent(majority['accuracy'])} ({majority['answer']!r})" if majority else "-",
            *(accuracy_cell(report["tasks"][task]) for report in reports),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Predictions",
        "",
        "Training majority: always giving the most frequent answer of the adapter's training data (its "
        "comoe_data.json), scored on this sample. Generation: the share of empty / repeated / unparseable "
        "responses / the most frequent answer.",
    ]
    for label, report in zip(labels, reports, strict=True):
        lines += [
            "",
            f"### {label}",
            "",
            "| task | accuracy | training majority | predicted answers | generation |",
            "|---|---|---|---|---|",
        ]
        for task, row in report["tasks"].items():
            cells = [
                task,
                accuracy_cell(row),
                train_majority_cell(row),
                predicted_cell(row),
                generation_cell(row),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Warnings", ""]
    warnings = [
        f"- {label}: {line}" if len(reports) > 1 else f"- {line}"
        for label, report in zip(labels, reports, strict=True)
        for line in report.get("warnings", [])
    ]
    lines += warnings or ["None: no task's predictions collapsed or stayed at a constant answer's level."]
    if comparison is not None:
        lines += ["", "## Paired comparison", "", *comparison_markdown(comparison)]
    if plot is not None:
        lines += ["", f"![accuracy per task]({plot})"]
    return "\n".join(lines).rstrip() + "\n"


def plot_accuracy(reports: list[dict[str, Any]], labels: list[str], output: Path) -> Path:
    """One panel per task: each model's accuracy with its 95% interval, the chance level, the sample's
    majority answer, and each adapter's training-majority answer scored on the sample."""
    tasks = list(reports[0]["tasks"])
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns + 0.8 * len(labels), 2.8 * rows), squeeze=False
    )
    positions = list(range(len(labels)))
    for ax, task in zip(axes.flat, tasks, strict=False):
        values = [report["tasks"][task] for report in reports]
        accuracy = [100 * v["accuracy"] for v in values]
        errors = [
            [max(0.0, 100 * (v["accuracy"] - v["ci95"][0])) for v in values],  # Wilson at 0: 1e-17 above
            [max(0.0, 100 * (v["ci95"][1] - v["accuracy"])) for v in values],
        ]
        ax.errorbar(positions, accuracy, yerr=errors, fmt="o", color="tab:blue", capsize=4, label="accuracy")
        row = values[0]
        if row.get("chance") is not None:
            ax.axhline(100 * row["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
        if row.get("majority"):
            ax.axhline(
                100 * row["majority"]["accuracy"], color="tab:red", linestyle=":", label="majority (sample)"
            )
        for position, value in zip(positions, values, strict=True):
            if value.get("train_majority"):
                level = 100 * value["train_majority"]["accuracy"]
                ax.hlines(
                    level, position - 0.3, position + 0.3, color="tab:orange", label="majority (training)"
                )
        ax.set_title(f"{task} (n={row['n']})", fontsize=9)
        ax.set_xticks(positions, labels, fontsize=8, rotation=20 if len(labels) > 2 else 0)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy, %", fontsize=8)
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.04, 1, 1))
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def write_summary(
    path: str | Path,
    reports: list[dict[str, Any]],
    labels: list[str],
    comparison: dict[str, Any] | None = None,
) -> list[Path]:
    """The summary markdown at `path` (.md) and its plot beside it (.png); returns both paths."""
    path = Path(path).with_suffix(".md")
    plot = plot_accuracy(reports, labels, path.with_suffix(".png"))
    atomic_write_text(path, summary_markdown(reports, labels, comparison, plot.name))
    return [path, plot]
