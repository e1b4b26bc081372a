"""A CoMoE setting chosen on a validation split, for the built-in comparison: the contrastive weight
(`--choice lambda`: reproduce.py's `comoe` at 0.01 and `comoe_w0.1` at 0.1) or the routers' learning-rate
ratio (`--choice router`: `comoe` at 1 and `comoe_router10` at 10).

    python benchmarks/select_on_validation.py [--choice lambda | router] [--variant builtin | builtin_long]
                                              [--workdir runs/reproduce-builtin]

For every seed of benchmarks/results/reproduce-<variant>.json that has a run of each candidate, every
candidate's adapter is evaluated on the built-in *validation* split (100 questions per task, generated from
their own seed, disjoint from the training and test questions). The value with the higher validation
accuracy is chosen for that seed, without looking at the test set. Its test run is then compared with
MoE-LoRA and LoRA by the same paired bootstrap as the reproduction. A value becomes a preset default only
if it wins here. Resumable: validation accuracies are kept in
benchmarks/results/<choice>-selection-<variant>.json.
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
from reproduce import header, interval, paired_difference, run_name  # noqa: E402  (a sibling script, not a package)

CHOICES = {  # --choice: the setting, and the reproduce.py method that trained with each of its values
    "lambda": ("lambda", {"comoe": 0.01, "comoe_w0.1": 0.1}),
    "router": ("router_lr_ratio", {"comoe": 1.0, "comoe_router10": 10.0}),
}


def validation_accuracy(adapter: Path, tasks: list[str], limit: int) -> float:
    report = run_eval(
        EvalArgs(
            adapter=str(adapter), tasks=tasks, split="validation", limit=limit, mode="generate", batch_size=16
        )
    )
    return report["average"]


def select(
    runs: list[dict],
    candidates: dict[str, float],
    state: dict,
    validate: Callable[[str], float],
    save: Callable[[], None],
) -> None:
    """Fill `state` with each seed's validation accuracies (`validate(run name)`, saved after each), the
    value chosen per seed among `candidates` (method: value), its test average and its paired differences
    with moe and lora."""
    seeds = sorted(set.intersection(*({r["seed"] for r in runs if r["method"] == m} for m in candidates)))
    for seed in seeds:
        for method in candidates:
            key = run_name(method, seed)
            if key not in state["validation"]:
                state["validation"][key] = validate(key)
                save()
    chosen = {seed: max(candidates, key=lambda m: state["validation"][run_name(m, seed)]) for seed in seeds}
    selected = [r for r in runs if r["method"] == chosen.get(r["seed"])]
    state["chosen"] = {str(seed): candidates[m] for seed, m in chosen.items()}
    state["test_average"] = {str(r["seed"]): r["average"] for r in selected}
    state["differences"] = {
        other: paired_difference(selected, [r for r in runs if r["method"] == other])
        for other in ("moe", "lora")
    }


def table(setting: str, candidates: dict[str, float], state: dict) -> str:
    values = [f"validation, {setting} {value:g}" for value in candidates.values()]
    lines = header("seed", *values, f"chosen {setting}", "test average")
    for seed, value in state["chosen"].items():
        validation = [state["validation"][run_name(m, int(seed))] for m in candidates]
        accuracies = " | ".join(f"{100 * v:.1f}" for v in validation)
        lines.append(f"| {seed} | {accuracies} | {value:g} | {100 * state['test_average'][seed]:.1f} |")
    lines.append("")
    for other, d in state["differences"].items():
        if d:
            lines.append(
                f"- CoMoE ({setting} chosen on validation) - {other}: {100 * d['mean']:+.1f} "
                f"{interval(d['ci95'])} over questions, {interval(d['seed_ci95'])} over seeds (t)"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--choice", choices=sorted(CHOICES), default="lambda", help="the setting chosen")
    parser.add_argument("--variant", default="builtin", help="the reproduce.py variant whose runs are used")
    parser.add_argument("--workdir", default="runs/reproduce-builtin", help="reproduce.py's --workdir")
    parser.add_argument("--limit", type=int, default=100, help="validation questions per task")
    options = parser.parse_args()
    reproduction = json.loads((HERE / "results" / f"reproduce-{options.variant}.json").read_text())
    tasks = reproduction["config"]["eval_tasks"]
    setting, candidates = CHOICES[options.choice]
    path = HERE / "results" / f"{options.choice}-selection-{options.variant}.json"
    state = json.loads(path.read_text()) if path.is_file() else {"validation": {}}
    runs_dir = Path(options.workdir) / f"reproduce-{options.variant}"

    def validate(run: str) -> float:
        return validation_accuracy(runs_dir / run / "adapter", tasks, options.limit)

    def save() -> None:
        atomic_write_text(path, json.dumps(state, indent=2) + "\n")

    select(reproduction["runs"], candidates, state, validate, save)
    save()
    summary = table(setting, candidates, state)
    atomic_write_text(path.with_suffix(".md"), summary)
    print(summary)


if __name__ == "__main__":
    main()
