"""comoe.evaluation.compare and `comoe compare`: the paired bootstrap against a hand-written seeded loop, the
same numbers as benchmarks/reproduce.py on the same answers, seed pairing, and reports of different
questions refused in one line naming the first mismatch."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from comoe.cli import main
from comoe.evaluation.compare import ALL, compare_reports, format_comparison, read_report
from comoe.evaluation.stats import seed_interval

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reproduce.py"


def report(correct: dict[str, list[bool]], label=None) -> dict:
    rows = [
        {
            "task": task,
            "answer": "a",
            "predicted": "a" if ok else "b",
            "correct": ok,
            "question": f"{task}-{i}",
        }
        for task, marks in correct.items()
        for i, ok in enumerate(marks)
    ]
    result = {"tasks": {}, "examples": rows}
    return {**result, "label": label} if label else result


def write(path: Path, correct: dict[str, list[bool]]) -> str:
    path.write_text(json.dumps(report(correct)))
    return str(path)


A = {"x": [True, False, True, True, False, True], "y": [False, False, True, True]}
B = {"x": [False, False, True, False, False, True], "y": [True, False, False, True]}


def test_the_paired_bootstrap_is_the_hand_computed_seeded_resampling():
    result = compare_reports([[report(A)], [report(B)]], ["a", "b"], samples=300, seed=5)
    (comparison,) = result["comparisons"]
    assert comparison["label"] == "b − a"  # later minus earlier
    diffs = [int(q) - int(p) for task in ("x", "y") for p, q in zip(A[task], B[task], strict=True)]
    rng, means = random.Random(5), []
    for _ in range(300):
        picks = [diffs[rng.randrange(len(diffs))] for _ in diffs]
        means.append(sum(picks) / len(picks))
    means.sort()
    pooled = comparison["tasks"][ALL]
    assert pooled["ci95"] == [means[7], means[291]]  # the 2.5% and 97.5% order statistics of 300
    assert pooled["mean"] == pytest.approx(sum(diffs) / 10) and pooled["n"] == 10
    assert pooled["discordant"] == pytest.approx(4 / 10) and pooled["seed_ci95"] is None
    assert pooled["questions_for_1_point"] == 31360  # (1.96 + 0.84)^2 * 0.4 / 0.01^2
    assert comparison["tasks"]["x"]["mean"] == pytest.approx(-2 / 6) and comparison["tasks"]["y"]["mean"] == 0
    assert result["sides"][0]["accuracy"] == {"x": 4 / 6, "y": 2 / 4, ALL: 6 / 10}
    assert comparison["verdict"].startswith("no difference shown between b and a: -20.0 points, 95% CI [")


def test_several_seeds_give_reproduce_py_numbers_on_the_same_answers():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    rng = random.Random(1)
    answers = {
        (method, seed): {task: [rng.random() < 0.6 for _ in range(8)] for task in ("x", "y")}
        for method in ("a", "b")
        for seed in range(3)
    }
    runs = {m: [{"method": m, "seed": s, "correct": answers[m, s]} for s in range(3)] for m in ("a", "b")}
    expected = reproduce.paired_difference(runs["b"], runs["a"], samples=400)
    result = compare_reports(
        [[report(answers["a", s]) for s in range(3)], [report(answers["b", s]) for s in range(3)]],
        ["a", "b"],
        samples=400,
    )
    pooled = result["comparisons"][0]["tasks"][ALL]
    for key in ("mean", "ci95", "seed_ci95", "per_seed", "discordant"):
        assert pooled[key] == pytest.approx(expected[key]), key
    assert pooled["seeds_for_1_point"] == reproduce.seeds_to_detect(expected["per_seed"])
    config = {"eval_tasks": ["x", "y"], "methods": {"a": {}, "b": {}}, "comparisons": [["b", "a"]]}
    row = reproduce.task_differences(runs, config)[-1]  # per task: mean of seeds [seed interval]
    cells = [
        f"{100 * t['mean']:+.1f} {reproduce.interval(t['seed_ci95'])}"
        for t in (result["comparisons"][0]["tasks"][task] for task in ("x", "y"))
    ]
    assert row == "| b − a | " + " | ".join(cells) + " |"
    assert result["comparisons"][0]["tasks"]["x"]["seed_ci95"] == pytest.approx(
        seed_interval(reproduce.seed_means(reproduce.paired_answers(runs["b"], runs["a"], tasks=["x"])))
    )


def test_one_report_pairs_with_every_seed_and_unequal_seed_counts_are_refused():
    base = report({"x": [False, False, True]})
    seeds = [report({"x": [True, False, True]}), report({"x": [True, True, True]})]
    result = compare_reports([[base], seeds], ["base", "tuned"], samples=200)
    pooled = result["comparisons"][0]["tasks"][ALL]
    assert pooled["per_seed"] == pytest.approx([1 / 3, 2 / 3]) and pooled["seed_ci95"] is not None
    with pytest.raises(ValueError, match="other has 3 reports and tuned 2: give each side the same number"):
        compare_reports([seeds, [base, base, base]], ["tuned", "other"])


def test_reports_of_other_questions_are_refused_naming_the_first_mismatch():
    other = report(A)
    other["examples"][7]["question"] = "something-else"
    with pytest.raises(
        ValueError, match=r"b report 1: question 8 \(task y, its question 2\) is not a report 1's"
    ):
        compare_reports([[report(A)], [other]], ["a", "b"])
    with pytest.raises(ValueError, match="tasks x, but a report 1 has x, y"):
        compare_reports([[report(A)], [report({"x": A["x"]})]], ["a", "b"])
    with pytest.raises(ValueError, match=r"a report 1 and b report 1 hold different numbers of questions \(6 vs 5\)"):
        compare_reports([[report({"x": A["x"]})], [report({"x": A["x"][:5]})]], ["a", "b"])
    shorter = report({"x": A["x"][:5]})  # another --limit draws other questions: the count is said first
    shorter["examples"][0]["question"] = "another"
    with pytest.raises(ValueError, match=r"different numbers of questions \(6 vs 5\); compare reports of"):
        compare_reports([[report({"x": A["x"]})], [shorter]], ["a", "b"])
    # reports written before questions had ids pair by task and gold answer
    old = [{key: value for key, value in row.items() if key != "question"} for row in report(A)["examples"]]
    assert (
        compare_reports([[{"examples": old}], [{"examples": old}]], ["a", "b"], samples=100)["questions"]
        == 10
    )
    changed = [dict(row) for row in old]
    changed[0]["answer"] = "z"
    with pytest.raises(
        ValueError, match=r"question 1 \(task x, its question 1\) is not a report 1's \(answer 'z' vs"
    ):
        compare_reports([[{"examples": old}], [{"examples": changed}]], ["a", "b"])


def test_cli_compare_refuses_reports_of_other_questions_in_one_line(tmp_path, capsys):
    first = write(tmp_path / "lora.json", A)
    second = write(tmp_path / "comoe.json", {"x": A["x"], "z": A["y"]})
    assert main(["compare", first, second]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(
        f"comoe: error: {second}: tasks x, z, but {first} has x, y; compare reports of the same"
    )
    assert main(["compare", first]) == 2
    assert (
        f"error: reports: give at least two sides to compare (comoe compare A.json B.json), got 1: {first}"
        in (capsys.readouterr().err)
    )
    assert main(["compare", first, str(tmp_path / "missing.json")]) == 2
    assert f"{tmp_path / 'missing.json'}: no such report file" in capsys.readouterr().err


def test_cli_compare_prints_the_paired_verdict_and_takes_seeds_either_way(tmp_path, capsys):
    a = [write(tmp_path / f"lora_seed{s}.json", {"x": A["x"][s:] + A["x"][:s]}) for s in range(2)]
    b = [write(tmp_path / f"comoe_seed{s}.json", {"x": B["x"][s:] + B["x"][:s]}) for s in range(2)]
    assert main(["compare", *a, "--", *b, "--samples", "200", "--output", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(
        "6 questions (1 task), the same in every report: lora_seed* (2 reports), comoe_seed* (2 reports)"
    )
    assert (
        "comoe_seed* − lora_seed* (accuracy %, difference in points)" in printed
        and "95% CI, seeds (t)" in printed
    )
    assert "\nverdict: " in printed
    assert main(["compare", ",".join(a), ",".join(b), "--samples", "200"]) == 0
    assert capsys.readouterr().out == printed
    saved = json.loads((tmp_path / "c.json").read_text())
    assert format_comparison(saved) == printed.rstrip("\n")
    assert "| task | n | points |" in (tmp_path / "c.md").read_text()
    assert read_report(a[0])["examples"][0]["question"] == "x-0"


def test_models_that_are_never_one_right_one_wrong_get_no_power_figure():
    from comoe.evaluation.compare import format_comparison, verdict

    row = {
        "mean": 0.0,
        "ci95": [0.0, 0.0],
        "n": 4,
        "discordant": 0.0,
        "questions_for_1_point": 0,
        "seed_ci95": None,
        "per_seed": [0.0],
    }
    assert verdict("a", "b", row).endswith("no question is answered right by one and wrong by the other")
    result = {
        "questions": 4,
        "tasks": ["t"],
        "sides": [
            {"label": "a", "seeds": 1, "accuracy": {"t": 0.5}},
            {"label": "b", "seeds": 1, "accuracy": {"t": 0.5}},
        ],
        "comparisons": [
            {
                "a": "a",
                "b": "b",
                "seeds": 1,
                "label": "a − b",
                "tasks": {"t": {**row, "seeds_for_1_point": None}},
                "verdict": "v",
            }
        ],
    }
    text = format_comparison(result)
    assert "one right" in text and "n/a" in text and " differ " not in text
