"""CoMoE at the contrastive weight chosen on a validation split, for the built-in comparison.

    python benchmarks/select_lambda.py [--variant builtin | builtin_long] [--workdir runs/reproduce-builtin]

For every seed of benchmarks/results/reproduce-<variant>.json that has both CoMoE runs (lambda = 0.01:
`comoe`, lambda = 0.1: `comoe_w0.1`), both adapters are evaluated on the built-in *validation* split
(100 questions per task, generated from their own seed, disjoint from the training and test questions).
The lambda with the higher validation accuracy is chosen for that seed, without looking at the test set.
Its test run is then compared with MoE-LoRA and LoRA by the same paired bootstrap as the reproduction.
Resumable: validation accuracies are kept in benchmarks/results/lambda-selection-<variant>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
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


def select(runs: list[dict], state: dict, validate: Callable[[str], float], save: Callable[[], None]) -> None:
    """Fill `state` with each seed's validation accuracies (`validate(run name)`, saved after each), the
    lambda chosen per seed, its test average and its paired differences with moe and lora."""
    seeds = sorted(
        {r["seed"] for r in runs if r["method"] == "comoe_w0.1"}
        & {r["seed"] for r in runs if r["method"] == "comoe"}
    )
    for seed in seeds:
        for method in CANDIDATES:
            key = f"{method}-seed{seed}"
            if key not in state["validation"]:
                state["validation"][key] = validate(key)
                save()
    chosen = {seed: max(CANDIDATES, key=lambda m: state["validation"][f"{m}-seed{seed}"]) for seed in seeds}
    selected = [r for r in runs if r["method"] == chosen.get(r["seed"])]
    state["chosen"] = {str(seed): CANDIDATES[m] for seed, m in chosen.items()}
    state["test_average"] = {str(r["seed"]): r["average"] for r in selected}
    state["differences"] = {
        other: paired_difference(selected, [r for r in runs if r["method"] == other])
        for other in ("moe", "lora")
    }


def table(state: dict) -> str:
    lines = [
        "| seed | validation, lambda 0.01 | validation, lambda 0.1 | chosen lambda | test average |",
        "|---|---|---|---|---|",
    ]
    for seed, lam in state["chosen"].items():
        v = [100 * state["validation"][f"{m}-seed{seed}"] for m in CANDIDATES]
        lines.append(
            f"| {seed} | {v[0]:.1f} | {v[1]:.1f} | {lam} | {100 * state['test_average'][seed]:.1f} |"
        )
    lines.append("")
    for other, d in state["differences"].items():
        if d:
            low, high = (100 * x for x in d["ci95"])
            mean = 100 * d["mean"]
            lines.append(
                f"- CoMoE (lambda chosen on validation) - {other}: {mean:+.1f} [{low:+.1f}, {high:+.1f}]"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="builtin", help="the reproduce.py variant whose runs are used")
    parser.add_argument("--workdir", default="runs/reproduce-builtin", help="reproduce.py's --workdir")
    parser.add_argument("--limit", type=int, default=100, help="validation questions per task")
    options = parser.parse_args()
    reproduction = json.loads((HERE / "results" / f"reproduce-{options.variant}.json").read_text())
    tasks = reproduction["config"]["eval_tasks"]
    path = HERE / "results" / f"lambda-selection-{options.variant}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"validation": {}}
    runs_dir = Path(options.workdir) / f"reproduce-{options.variant}"

    def validate(run: str) -> float:
        return validation_accuracy(runs_dir / run / "adapter", tasks, options.limit)

    def save() -> None:
        atomic_write_text(path, json.dumps(state, indent=2) + "\n")

    select(reproduction["runs"], state, validate, save)
    save()
    atomic_write_text(path.with_suffix(".md"), table(state))
    print(table(state))


if __name__ == "__main__":
    main()
