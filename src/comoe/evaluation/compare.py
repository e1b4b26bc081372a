"""`comoe compare`: question-by-question paired comparison of eval reports of the same questions.

Each side is one model (an adapter, or the base model) with one report per training seed. Every pair of
sides is compared, later minus earlier (put the reference first), per task and over all questions: the mean
difference with a paired bootstrap 95% interval over questions, the share of questions answered
differently, the paired questions a 1-point difference needs, and with several seeds per side Student's t
over the per-seed differences (would another training run agree?; clipped to the feasible -100 to +100
points, which two or three seeds' t interval often overruns) and the seeds a 1-point difference needs: the
statistics of comoe.evaluation.stats, which benchmarks/reproduce.py uses too.

Seeds pair by position (a side's first report with the other's first); a side of one report (an untrained
base model: one deterministic run) pairs with every report of the other. Reports of different questions
are refused, saying how they differ: other tasks, different numbers of questions, or the first question
that differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from comoe.evaluation.settings import CompareArgs, compare_sides
from comoe.evaluation.stats import paired_difference, questions_to_detect, seeds_to_detect
from comoe.files import atomic_write_text

MINUS = "−"  # the difference sign in labels: 'comoe − lora'
ALL = "all questions"  # the key and row of the pooled comparison


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """An eval report JSON, refused in one line (naming the file) unless it holds per-question rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such report file")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a JSON eval report ({error})") from None
    check_report(report, str(path))
    return report


def check_report(report: Any, name: str) -> None:
    rows = report.get("examples") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(
            f"{name}: no per-question rows ('examples'): not a `comoe eval` report, or one of no questions"
        )
    for index, row in enumerate(rows):
        if not isinstance(row, dict) or "task" not in row or "correct" not in row:
            raise ValueError(
                f"{name}: examples[{index}] has no 'task' and 'correct': not a comoe eval report"
            )


def question_keys(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, question id) per row; rows of reports written before questions had ids are keyed by their
    gold answer, a weaker check of the same questions."""
    return [
        (str(row["task"]), str(row.get("question") or f"answer {row.get('answer')!r}"))
        for row in report["examples"]
    ]


def check_same_questions(reports: list[dict[str, Any]], names: list[str]) -> None:
    """Every report holds the first one's questions in the same order; else ValueError naming the first
    report that differs and how: its tasks, its number of questions, or its first question that differs."""
    first, reference = names[0], question_keys(reports[0])
    hint = "compare reports of the same questions (the same --data/--tasks, --limit and --seed)"
    for report, name in zip(reports[1:], names[1:], strict=True):
        keys = question_keys(report)
        tasks, reference_tasks = (
            list(dict.fromkeys(t for t, _ in keys)),
            list(dict.fromkeys(t for t, _ in reference)),
        )
        if tasks != reference_tasks:
            raise ValueError(
                f"{name}: tasks {', '.join(tasks)}, but {first} has {', '.join(reference_tasks)}; {hint}"
            )
        if len(keys) != len(reference):  # said first: then every question after a cut differs as well
            raise ValueError(
                f"{first} and {name} hold different numbers of questions ({len(reference)} vs {len(keys)}); "
                f"{hint}"
            )
        for index, (mine, theirs) in enumerate(zip(keys, reference, strict=True)):
            if mine != theirs:
                position = sum(task == mine[0] for task, _ in keys[:index]) + 1
                raise ValueError(
                    f"{name}: question {index + 1} (task {mine[0]}, its question {position}) is not "
                    f"{first}'s ({mine[1]} vs {theirs[1]}); {hint}"
                )


def correct_by_task(report: dict[str, Any]) -> dict[str, list[int]]:
    """Per task (in report order), 1/0 per question."""
    result: dict[str, list[int]] = {}
    for row in report["examples"]:
        result.setdefault(str(row["task"]), []).append(int(bool(row["correct"])))
    return result


def paired_reports(
    a: list[dict[str, Any]], b: list[dict[str, Any]], la: str, lb: str
) -> list[tuple[dict, dict]]:
    """The seed pairs of two sides: by position, or a one-report side with every report of the other."""
    if len(a) == len(b):
        return list(zip(a, b, strict=True))
    if len(b) == 1:
        return [(report, b[0]) for report in a]
    if len(a) == 1:
        return [(a[0], report) for report in b]
    raise ValueError(
        f"{la} has {len(a)} reports and {lb} {len(b)}: give each side the same number of seeds (they pair in "
        "order), or one report for a model that was not trained (the base)"
    )


def compare_reports(
    sides: list[list[dict[str, Any] | str | os.PathLike]],
    labels: list[str] | None = None,
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare every pair of sides (each a list of reports or report paths, one per training seed), later
    minus earlier, per task and over all questions; see the module docstring. Returns the comparison
    (format_comparison prints it)."""
    if len(sides) < 2 or any(not side for side in sides):
        raise ValueError("compare: give at least two sides, each of at least one report")
    names = [[str(item) if not isinstance(item, dict) else "" for item in side] for side in sides]
    loaded = [[item if isinstance(item, dict) else read_report(item) for item in side] for side in sides]
    labels = labels or side_labels(loaded, names)
    if len(labels) != len(sides) or len(set(labels)) != len(labels):
        raise ValueError(f"labels {labels}: give one distinct label per side ({len(sides)} sides)")
    flat = [report for side in loaded for report in side]
    flat_names = [
        name or f"{labels[s]} report {i + 1}" for s, side in enumerate(names) for i, name in enumerate(side)
    ]
    for report, name in zip(flat, flat_names, strict=True):
        check_report(report, name)
    check_same_questions(flat, flat_names)
    tasks = {task: len(rows) for task, rows in correct_by_task(flat[0]).items()}
    result: dict[str, Any] = {
        "questions": sum(tasks.values()),
        "tasks": tasks,
        "samples": samples,
        "seed": seed,
        "sides": [
            {"label": label, "reports": side_names, "seeds": len(side), "accuracy": side_accuracy(side)}
            for label, side, side_names in zip(labels, loaded, names, strict=True)
        ],
        "comparisons": [],
    }
    for j in range(len(sides)):
        for i in range(j):
            pairs = paired_reports(loaded[j], loaded[i], labels[j], labels[i])
            result["comparisons"].append(
                compare_pair(pairs, labels[j], labels[i], list(tasks), samples, seed)
            )
    return result


def side_accuracy(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Per task and over all questions, the accuracy averaged over a side's reports."""
    per_report = [correct_by_task(report) for report in reports]
    result = {
        task: sum(sum(r[task]) / len(r[task]) for r in per_report) / len(per_report) for task in per_report[0]
    }
    pooled = [sum(map(sum, r.values())) / sum(map(len, r.values())) for r in per_report]
    result[ALL] = sum(pooled) / len(pooled)
    return result


def compare_pair(
    pairs: list[tuple[dict, dict]], a: str, b: str, tasks: list[str], samples: int, seed: int
) -> dict[str, Any]:
    """a − b over the seed pairs, per task and pooled over all questions (stats.paired_difference), with
    the questions (and seeds) a 1-point difference needs, and the verdict."""
    by_task = [(correct_by_task(x), correct_by_task(y)) for x, y in pairs]
    rows = {}
    for task in [*tasks, ALL]:
        chosen = tasks if task == ALL else [task]
        diffs = [[p - q for t in chosen for p, q in zip(x[t], y[t], strict=True)] for x, y in by_task]
        row = paired_difference(diffs, samples, seed)
        row["n"] = len(diffs[0])
        row["questions_for_1_point"] = questions_to_detect(row["discordant"])
        row["seeds_for_1_point"] = seeds_to_detect(row["per_seed"])
        rows[task] = row
    return {
        "label": f"{a} {MINUS} {b}",
        "a": a,
        "b": b,
        "seeds": len(pairs),
        "tasks": rows,
        "verdict": verdict(a, b, rows[ALL]),
    }


def verdict(a: str, b: str, row: dict[str, Any]) -> str:
    """One line: is a better than b, over these questions and, with several seeds, over training runs?"""
    points = f"{100 * row['mean']:+.1f} points"
    questions = f"95% CI {points_interval(row['ci95'])} over {row['n']} paired questions"
    need = f"about {row['questions_for_1_point']:,} questions would resolve ±1 point"
    if row["discordant"] == 0:
        need = "no question is answered right by one and wrong by the other"
    better = "better" if row["mean"] > 0 else "worse"
    if row["seed_ci95"] is not None:
        seeds = f"95% CI {points_interval(row['seed_ci95'])} over {len(row['per_seed'])} seeds"
        if excludes_zero(row["seed_ci95"]):
            return (
                f"{a} is {better} than {b}: {points}, {seeds} (another training run would agree), {questions}"
            )
        if excludes_zero(row["ci95"]):
            return (
                f"{a} is {better} than {b} on these questions ({points}, {questions}) but not across "
                f"training seeds ({seeds}; about {row['seeds_for_1_point']} seeds would resolve ±1 point)"
            )
        return f"no difference shown between {a} and {b}: {points}, {seeds}, {questions}; {need}"
    if excludes_zero(row["ci95"]):
        return (
            f"{a} is {better} than {b} on these questions: {points}, {questions} (one training run per side: "
            "compare several seeds per side to know whether another run would agree)"
        )
    return f"no difference shown between {a} and {b}: {points}, {questions} includes 0; {need}"


def excludes_zero(interval: list[float]) -> bool:
    return interval[0] > 0 or interval[1] < 0


def points_interval(bounds: list[float] | None) -> str:
    """'[low, high]' in percentage points, '-' for none (reproduce.py's tables write them so)."""
    return "-" if bounds is None else f"[{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}]"


def side_labels(sides: list[list[dict[str, Any]]], names: list[list[str]]) -> list[str]:
    """A label per side, from the labels its reports carry (eval writes the adapter's, e.g.
    'lora-s0/adapter'), else from its file names: the one name of a side, or the part its names share with
    a '*' for where they differ ('lora-s*/adapter'); numbered by position where sides still coincide."""

    def shared(texts: list[str]) -> str:
        if len(set(texts)) == 1:
            return texts[0]
        start = os.path.commonprefix(texts)
        end = os.path.commonprefix([text[len(start) :][::-1] for text in texts])[::-1]
        return f"{start}*{end}"

    labels = [shared([str(r.get("label") or "") for r in side]) for side in sides]
    if not all(label.strip("*") for label in labels) or len(set(labels)) < len(labels):
        stems = [shared([Path(name).stem for name in side]) if all(side) else "" for side in names]
        labels = [stem.strip("*") and stem or f"side {i + 1}" for i, stem in enumerate(stems)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({index + 1})" for index, label in enumerate(labels)]
    return labels


def _questions(row: dict[str, Any]) -> str:
    """The questions a 1-point difference needs, or n/a when no question tells the two apart."""
    return f"{row['questions_for_1_point']:,}" if row["discordant"] > 0 else "n/a"


def format_comparison(result: dict[str, Any]) -> str:
    """The comparison as plain text: per pair of sides, its title, a table (task, n, each side's accuracy,
    the difference in points, its intervals, the share of questions one side answers right and the other
    wrong ("one right"), the questions and seeds a 1-point difference needs) and the verdict."""
    sides = result["sides"]
    described = ", ".join(
        f"{side['label']} ({side['seeds']} report{'s' if side['seeds'] > 1 else ''})" for side in sides
    )
    tasks = f"{len(result['tasks'])} task{'s' if len(result['tasks']) > 1 else ''}"
    lines = [f"{result['questions']} questions ({tasks}), the same in every report: {described}"]
    accuracy = {side["label"]: side["accuracy"] for side in sides}
    for comparison in result["comparisons"]:
        a, b, seeds = comparison["a"], comparison["b"], comparison["seeds"] > 1
        header = ["task", "n", b, a, "points", "95% CI, questions"]
        header += ["95% CI, seeds (t)"] if seeds else []
        header += ["one right", "questions for ±1 point"] + (["seeds for ±1 point"] if seeds else [])
        table = [header]
        for task, row in comparison["tasks"].items():
            cells = [task, str(row["n"]), f"{100 * accuracy[b][task]:.1f}", f"{100 * accuracy[a][task]:.1f}"]
            cells += [f"{100 * row['mean']:+.1f}", points_interval(row["ci95"])]
            cells += [points_interval(row["seed_ci95"])] if seeds else []
            cells += [f"{100 * row['discordant']:.1f}%", _questions(row)]
            cells += [str(row["seeds_for_1_point"] or "-")] if seeds else []
            table.append(cells)
        widths = [max(len(row[column]) for row in table) for column in range(len(header))]
        lines += ["", f"{comparison['label']} (accuracy %, difference in points)"]
        lines += [
            "  ".join(
                cell.ljust(width) if column == 0 else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in table
        ]
        lines.append(f"verdict: {comparison['verdict']}")
    return "\n".join(lines)


def comparison_markdown(result: dict[str, Any]) -> list[str]:
    """The comparison as markdown tables (one per pair of sides) with their verdicts."""
    lines = []
    for comparison in result["comparisons"]:
        seeds = comparison["seeds"] > 1
        columns = [
            "task",
            "n",
            "points",
            "95% CI, questions",
            *(["95% CI, seeds (t)", "per seed"] if seeds else []),
        ]
        columns += ["one right", "questions for ±1 point", *(["seeds for ±1 point"] if seeds else [])]
        lines += [
            f"### {comparison['label']}",
            "",
            "| " + " | ".join(columns) + " |",
            "|---" * len(columns) + "|",
        ]
        for task, row in comparison["tasks"].items():
            cells = [task, str(row["n"]), f"{100 * row['mean']:+.1f}", points_interval(row["ci95"])]
            if seeds:
                cells += [
                    points_interval(row["seed_ci95"]),
                    ", ".join(f"{100 * d:+.1f}" for d in row["per_seed"]),
                ]
            cells += [f"{100 * row['discordant']:.1f}%", _questions(row)]
            cells += [str(row["seeds_for_1_point"] or "-")] if seeds else []
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"**Verdict:** {comparison['verdict']}", ""]
    return lines


def run_compare(args: CompareArgs) -> dict[str, Any]:
    """`comoe compare`: read the reports, compare them, and write the comparison JSON (and its markdown
    beside it) when --output is given; returns the comparison."""
    result = compare_reports(compare_sides(args.reports), args.labels, args.samples, args.seed)
    if args.output:
        output = Path(args.output)
        atomic_write_text(output, json.dumps(result, indent=2) + "\n")
        text = [
            "# Paired comparison",
            "",
            format_comparison(result).split("\n", 1)[0],
            "",
            *comparison_markdown(result),
        ]
        atomic_write_text(output.with_suffix(".md"), "\n".join(text))
    return result
