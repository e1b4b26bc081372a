"""CoMoE at the contrastive weight chosen on a validation split, for the built-in comparison.

    python benchmarks/select_lambda.py [--workdir runs/reproduce-builtin/reproduce-builtin]

For every seed of benchmarks/results/reproduce-builtin.json that has both CoMoE runs (lambda = 0.01:
`comoe`, lambda = 0.1: `comoe_w0.1`), both adapters are evaluated on the built-in *validation* split
(100 questions per task, generated from their own seed, disjoint from the training and test questions).
The lambda with the higher validation accuracy is chosen for that seed, without looking at the test set.
Its test run is then compared with MoE-LoRA and LoRA by the same paired bootstrap as the reproduction.
Resumable: validation accuracies are kept in the results JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from comoe.evaluation.runner import run_eval
from comoe.evaluation.settings import EvalArgs
from comoe.files import atomic_write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from reproduce import paired_difference  # noqa: E402  (a sibling script, not a package)

CANDIDATES = {"comoe": 0.01, "comoe_w0.1": 0.1}


def validation_accuracy(adapter: Path, tasks: list[str], limit: int) -> float:
    report = run_eval(
        EvalArgs(
            adapter=str(adapter), tasks=tasks, split="validation", limit=limit, mode="generate", batch_size=16
        )
    )
    return report["average"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/reproduce-builtin/reproduce-builtin")
    parser.add_argument("--limit", type=int, default=100, help="validation questions per task")
    parser.add_argument("--results", default=str(HERE / "results" / "lambda-selection.json"))
    options = parser.parse_args()
    reproduction = json.loads((HERE / "results" / "reproduce-builtin.json").read_text())
    runs, tasks = reproduction["runs"], reproduction["config"]["eval_tasks"]
    path = Path(options.results)
    state = json.loads(path.read_text()) if path.is_file() else {"validation": {}}
    seeds = sorted(
        {r["seed"] for r in runs if r["method"] == "comoe_w0.1"}
        & {r["seed"] for r in runs if r["method"] == "comoe"}
    )
    for seed in seeds:
        for method in CANDIDATES:
            key = f"{method}-seed{seed}"
            if key not in state["validation"]:
                adapter = Path(options.workdir) / key / "adapter"
                state["validation"][key] = validation_accuracy(adapter, tasks, options.limit)
                atomic_write_text(path, json.dumps(state, indent=2) + "\n")
    chosen = {seed: max(CANDIDATES, key=lambda m: state["validation"][f"{m}-seed{seed}"]) for seed in seeds}
    selected = [r for r in runs if r["method"] == chosen.get(r["seed"])]
    state["chosen"] = {str(seed): CANDIDATES[m] for seed, m in chosen.items()}
    state["test_average"] = {str(r["seed"]): r["average"] for r in selected}
    state["differences"] = {
        other: paired_difference(selected, [r for r in runs if r["method"] == other])
        for other in ("moe", "lora")
    }
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")
    lines = [
        "| seed | validation, lambda 0.01 | validation, lambda 0.1 | chosen lambda | test average |",
        "|---|---|---|---|---|",
    ]
    for seed in seeds:
        v = [100 * state["validation"][f"{m}-seed{seed}"] for m in CANDIDATES]
        test = 100 * state["test_average"][str(seed)]
        lines.append(f"| {seed} | {v[0]:.1f} | {v[1]:.1f} | {state['chosen'][str(seed)]} | {test:.1f} |")
    lines.append("")
    for other, d in state["differences"].items():
        if d:
            low, high = (100 * x for x in d["ci95"])
            mean = 100 * d["mean"]
            lines.append(
                f"- CoMoE (lambda chosen on validation) - {other}: {mean:+.1f} [{low:+.1f}, {high:+.1f}]"
            )
    table = "\n".join(lines) + "\n"
    atomic_write_text(path.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
