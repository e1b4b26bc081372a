"""comoe.recipes.report: the run's report.md from its files and two evaluation reports (a fake result),
the training curve's rows, and the accuracy table `comoe demo` prints."""

import json

import pytest

from comoe.evaluation.scoring import wilson_interval
from comoe.recipes.report import REPORT_NAME, accuracy_table, training_curve, write_report


def log_row(step: int) -> dict:
    return {
        "step": step,
        "task": 2.0 / step,
        "balance": 0.0,
        "contrastive": 0.5 / step,
        "lr": 1e-3 / step,
        "tokens_per_s": 1000.0 + step,
    }


def make_run(tmp_path, steps: int):
    run = tmp_path / "demo"
    run.mkdir()
    (run / "config.yaml").write_text("preset: comoe\nmax_steps: 12\nlr: 0.001\n")
    (run / "log.jsonl").write_text("".join(json.dumps(log_row(s)) + "\n" for s in range(1, steps + 1)))
    return run


def evaluation(accuracies: dict[str, tuple[int, int]], mode: str = "generate") -> dict:
    tasks = {
        name: {"accuracy": c / n, "n": n, "ci95": wilson_interval(c, n), "truncated": 0}
        for name, (c, n) in accuracies.items()
    }
    return {"tasks": tasks, "average": sum(t["accuracy"] for t in tasks.values()) / len(tasks), "mode": mode}


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (25, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]),
        (10, list(range(1, 11))),
        (3, [1, 2, 3]),
        (20, [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 20]),
    ],
)
def test_the_curve_keeps_evenly_spaced_rows_and_always_the_first_and_last(tmp_path, steps, expected):
    run = make_run(tmp_path, steps)
    assert [row["step"] for row in training_curve(run)] == expected
    assert training_curve(run)[0] == log_row(1)


def test_an_empty_log_has_no_curve(tmp_path):
    run = make_run(tmp_path, 0)
    assert training_curve(run) == []


def test_the_report_shows_settings_curve_and_per_task_change(tmp_path):
    run = make_run(tmp_path, 4)
    base = evaluation({"chain_sum": (2, 8), "gcd": (4, 8)})
    tuned = evaluation({"chain_sum": (6, 8), "gcd": (3, 8)})
    path = write_report(run, base, tuned)
    assert path == run / REPORT_NAME
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# comoe run: demo"
    assert "```yaml\nlr: 0.001\nmax_steps: 12\npreset: comoe\n```" in text  # the settings, sorted
    assert "| 1 | 2.0000 | 0.0000 | 0.5000 | 1.00e-03 | 1001 |" in lines
    assert "| 4 | 0.5000 | 0.0000 | 0.1250 | 2.50e-04 | 1004 |" in lines
    assert "## Accuracy per task (%, 95% Wilson CI; mode: generate)" in lines
    low, high = wilson_interval(2, 8)
    assert f"| chain_sum | 8 | - | - | 25.0 ({100 * low:.0f}–{100 * high:.0f}) | 75.0 (41–93) | +50.0 |" in lines
    assert any(line.startswith("| gcd | 8 | - | - | 50.0 (") and line.endswith("| -12.5 |") for line in lines)
    assert "| **average** | | | | 37.5 | 56.2 | +18.8 |" in lines
    assert "Warnings" not in text
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "log.jsonl", REPORT_NAME]
    assert "`tensorboard/`,\n`eval.json`" in text and "checkpoints" not in text  # no checkpoint was saved


def test_the_report_lists_the_checkpoints_folder_when_the_run_saved_one(tmp_path):
    run = make_run(tmp_path, 2)
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    text = write_report(run, evaluation({"a": (1, 2)}), evaluation({"a": (2, 2)})).read_text(encoding="utf-8")
    assert "`tensorboard/`, `checkpoints/`," in text


def test_the_accuracy_table_is_the_section_after_its_heading(tmp_path):
    run = make_run(tmp_path, 2)
    path = write_report(run, evaluation({"a": (1, 2)}, "loglik"), evaluation({"a": (2, 2)}, "loglik"))
    table = accuracy_table(path)
    assert table.startswith(
        "\n| task | n | chance | majority answer | base model | fine-tuned | change |\n"
        "|---|---|---|---|---|---|---|\n| a | 2 | - | - | 50.0 ("
    )
    assert "| **average** | | | | 50.0 | 100.0 | +50.0 |" in table
    assert "Training curve" not in table and "mode: loglik" not in table


def test_the_report_shows_chance_majority_and_collapse_warnings(tmp_path):
    run = make_run(tmp_path, 2)
    base = evaluation({"boolq": (5, 10)}, "loglik")
    tuned = evaluation({"boolq": (6, 10)}, "loglik")
    tuned["tasks"]["boolq"].update(chance=0.5, majority={"answer": "true", "accuracy": 0.6})
    tuned["warnings"] = ["boolq: predictions collapsed: 'true' for 10 of 10 questions (100%)"]
    text = write_report(run, base, tuned).read_text(encoding="utf-8")
    assert "| boolq | 10 | 50.0 | 60.0 (true) | 50.0 (" in text
    assert "- fine-tuned: boolq: predictions collapsed: 'true' for 10 of 10 questions (100%)" in text
