"""Reproduce the papers' comparison at SmolLM2-135M scale: base zero-shot, LoRA (matched parameters),
MoE-LoRA, CoMoE and MoELoRA, several seeds, multi-task commonsense training (or math), per-task evaluation,
specialisation measures, paired differences with two 95% intervals (over test questions and over training
seeds), overall and task by task, and the questions and seeds a 1-point difference would need; with
`reference:` in the variant (builtin), every trained method against it in the CoMoE paper's Table 1 shape,
the paper's averages (`paper_averages`) beside.

    python benchmarks/reproduce.py [--config benchmarks/reproduce.yaml] [--quick | --variant math]
                                   [--workdir runs/reproduce]

A variant is a section of the config whose keys override the full commonsense setting: `quick` (small
samples, ~15 minutes), `math` (math_data.json training, generated answers on the math test sets), and
`builtin` / `builtin_long` (the built-in reasoning-gym tasks, which the 135M model learns far above chance,
500 generated test questions per task, two training budgets).

Resumable: finished (method, seed) runs are kept in the results JSON and skipped when run again, and a
run stopped mid-way continues from its last checkpoint (every 100 steps). Several workers can share a
variant, e.g. one per seed: `--seeds 1 --methods lora,moe` picks a worker's share.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from comoe.adapter.method import method_for
from comoe.adapter.model import config_call_inputs
from comoe.analysis.pipeline import analyze
from comoe.analysis.settings import AnalyzeArgs
from comoe.config import BASELINES, ComoeConfig
from comoe.evaluation import stats
from comoe.evaluation.runner import run_eval
from comoe.evaluation.settings import EvalArgs
from comoe.evaluation.stats import (
    pooled_seed_intervals,
    questions_to_detect,
    seed_interval,
    seed_means,
    seeds_to_detect,
)
from comoe.files import atomic_write_text
from comoe.models.gguf import ALIASES, alias_cache, cache_root
from comoe.training.loop import train
from comoe.training.settings import TrainArgs

HERE = Path(__file__).resolve().parent
SPECIALISATION = {  # analysis summary key: column header (means over layers, see docs/analysis.md)
    "mean_mi_task_expert_bits": "I(task; expert) bits",
    "mean_nmi_task_expert": "I / H(task)",
    "mean_mi_token_expert_bits": "I(token bucket; expert) bits",
    "mean_expert_similarity": "expert cosine similarity",
    "mean_load_cv": "load CV",
}


def run_name(method: str, seed: int) -> str:
    """A trained run's folder under the work directory."""
    return f"{method}-seed{seed}"


def run_method(name: str, spec: dict[str, Any] | None, seed: int, config: dict[str, Any], work: Path) -> dict:
    """Train (unless base), evaluate and, for MoE methods, analyse one (method, seed)."""
    start = time.perf_counter()
    adapter, log = None, []
    # dtype and device for training, evaluation and analysis alike; absent keys keep the settings' defaults
    placement = {key: config[key] for key in ("dtype", "device") if key in config}
    if spec is not None:
        run = work / run_name(name, seed)
        args = TrainArgs(
            model=config["model"],
            preset=spec["preset"],
            adapter_config=spec.get("adapter_config", {}),
            data_dir=config["data_dir"],
            tasks=config["train_tasks"],
            train_limit=config["train_limit"],
            epochs=config["epochs"],
            lr=config["lr"],
            batch_size=config["batch_size"],
            **placement,
            seed=seed,
            output=str(run),
            save_steps=100,  # a run killed mid-way continues from its last checkpoint
            resume=run.exists(),
            **spec.get("train", {}),  # other training settings of this method, e.g. router_lr_ratio
        )
        train(args)
        adapter = str(run / "adapter")
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    trained = time.perf_counter() - start
    report = run_eval(
        EvalArgs(
            model=config["model"],
            adapter=adapter,
            data_dir=config["data_dir"],
            tasks=config["eval_tasks"],
            limit=config["eval_limit"],
            mode=config.get("eval_mode", "loglik"),
            batch_size=config.get("eval_batch_size", 16),
            **placement,
            max_new_tokens=config.get("max_new_tokens"),
            seed=0,
        )
    )
    result = {
        "method": name,
        "seed": seed,
        "train_seconds": trained,
        "eval_seconds": report["seconds"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in log) if log else None,
        "final_task_loss": statistics.mean(r["task"] for r in log[-10:]) if log else None,
        "final_contrastive": statistics.mean(r["contrastive"] for r in log[-10:]) if log else None,
        "accuracy": {task: row["accuracy"] for task, row in report["tasks"].items()},
        "average": report["average"],
        "correct": {
            task: [p["correct"] for p in report["examples"] if p["task"] == task] for task in report["tasks"]
        },
    }
    if adapter is not None:
        result["trainable_params"] = adapter_parameters(Path(adapter))
    # the process's high-water mark: one method per process gives that method's peak (train + evaluation)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if spec is not None and spec["preset"] not in BASELINES:
        summary = analyze(
            AnalyzeArgs(
                model=config["model"],
                adapter=adapter,
                data_dir=config["data_dir"],
                tasks=config.get("analysis_tasks", config["train_tasks"]),
                limit=config["analysis_limit"],
                **placement,
                output=str(run / "analysis"),
            )
        )
        result["specialisation"] = {k: summary[k] for k in summary if k.startswith("mean_")}
    return result


def adapter_parameters(adapter: Path) -> int:
    """Trainable parameters an adapter folder holds: the elements of every tensor in its safetensors file
    (experts, routers, DoRA magnitudes; PEFT and comoe folders alike)."""
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as weights:
        return sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118 (not a dict)


def counted_parameters(spec: dict[str, Any], config: dict[str, Any]) -> int | None:
    """A trained method's trainable parameters on the config's model, counted on the meta device (shapes
    only, no weights read; the same count as `adapter_parameters` of its adapter folder): the table's
    figure for runs recorded before `trainable_params` was kept. None when the model's config cannot be
    read here (an alias not yet converted, a hub id offline)."""
    name = config["model"]
    try:
        folder = alias_cache(name, cache_root(None)) if name in ALIASES else Path(name)
        model_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None
    preset = spec["preset"]
    adapter = ComoeConfig.from_preset(BASELINES.get(preset, preset), spec.get("adapter_config", {}))
    if adapter.tasks is None and "task_ids" in config_call_inputs(adapter):  # as training gives them
        adapter = dataclasses.replace(adapter, tasks=list(config["train_tasks"]))
    with torch.device("meta"):
        model = method_for(preset).build(AutoModelForCausalLM.from_config(model_config), adapter, False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def paired_answers(
    a: list[dict], b: list[dict], b_untrained: bool = False, tasks: list[str] | None = None
) -> list[list[int]]:
    """Per paired seed, in seed order (workers record runs in the order they end), a's answer minus b's on
    each test question (+1, 0, -1) of `tasks` (all of a's when None). An untrained b (the base model: one
    deterministic run) is paired with every seed of a; a trained one only seed by seed, so a half-finished
    reproduction never pairs one method's seed 1 with another's 0."""
    by_seed = {r["seed"]: r for r in b}
    diffs = []
    for run in sorted(a, key=lambda r: r["seed"]):
        other = b[0] if b_untrained and b else by_seed.get(run["seed"])
        if other is not None:
            diffs.append(
                [
                    int(x) - int(y)
                    for task in (tasks or run["correct"])
                    for x, y in zip(run["correct"][task], other["correct"][task], strict=True)
                ]
            )
    return diffs


def paired_difference(
    a: list[dict], b: list[dict], samples: int = 2000, b_untrained: bool = False
) -> dict[str, Any]:
    """Mean accuracy difference a - b over the same seeds and examples, with two 95% intervals (a paired
    bootstrap over questions, `ci95`, and Student's t over seeds, `seed_ci95`): the library's
    comoe.evaluation.stats.paired_difference, which `comoe compare` uses too. Seeds are paired as
    `paired_answers` pairs them."""
    return stats.paired_difference(paired_answers(a, b, b_untrained), samples)


def column_value(run: dict, column: str, papers: list[str]) -> float:
    """A run's accuracy on one task, its average, or the unweighted mean over the papers' tasks."""
    if column == "average":
        return run["average"]
    if column == "papers' average":
        return statistics.mean(run["accuracy"][task] for task in papers)
    return run["accuracy"][column]


def mean_spread(values: list[float], digits: int) -> str:
    """'mean ± sample std' ('mean' alone for one value, '-' for none)."""
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def interval(bounds: list[float] | None) -> str:
    """'[low, high]' in percentage points, '-' for none."""
    return "-" if bounds is None else f"[{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}]"


DIFFERENCE_COLUMNS = ("points", "95% CI, questions", "95% CI, seeds (t)", "per seed")


def difference_cells(diff: dict) -> str:
    """The DIFFERENCE_COLUMNS of a paired difference, in percentage points."""
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in diff["per_seed"])
    seeds = interval(diff["seed_ci95"])
    return f"{100 * diff['mean']:+.1f} | {interval(diff['ci95'])} | {seeds} | {per_seed}"


# recorded since the method-zoo runs; "-" for older runs
COST_COLUMNS = {"trainable parameters": ("trainable_params", 0), "peak RSS MB": ("peak_rss_mb", 0)}


def median_cell(runs: list[dict], key: str, digits: int) -> str:
    """The median of a key over the runs that recorded it, '-' when none did."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return f"{statistics.median(values):,.{digits}f}" if values else "-"


def header(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def summarise(results: list[dict], config: dict[str, Any]) -> str:
    """Markdown tables: accuracy mean ± std over seeds, time, paired differences, specialisation."""
    by_method = {m: runs for m in config["methods"] if (runs := [r for r in results if r["method"] == m])}
    papers = config.get("papers_tasks", [])
    columns = [*config["eval_tasks"], "average", *(["papers' average"] if papers else [])]
    lines = header("method", *columns)
    for method, runs in by_method.items():
        cells = [mean_spread([100 * column_value(r, column, papers) for r in runs], 1) for column in columns]
        lines.append(f"| {method} (n={len(runs)}) | " + " | ".join(cells) + " |")
    lines += ["", *header("method (median of seeds)", "train s", "eval s", "train tokens/s", *COST_COLUMNS)]
    for method, runs in by_method.items():
        speed = [r["tokens_per_s"] for r in runs if r["tokens_per_s"]]
        lines.append(
            f"| {method} | {statistics.median(r['train_seconds'] for r in runs):.0f} | "
            f"{statistics.median(r['eval_seconds'] for r in runs):.0f} | "
            + (f"{statistics.median(speed):.0f}" if speed else "-")
            + " | "
            + " | ".join(median_cell(runs, key, digits) for key, digits in COST_COLUMNS.values())
            + " |"
        )
    power = ("differ", "questions for ±1 point", "seeds for ±1 point")
    lines += ["", *header("comparison", *DIFFERENCE_COLUMNS, *power)]
    for a, b in config["comparisons"]:
        untrained = config["methods"].get(b, {}) is None
        diff = paired_difference(by_method.get(a, []), by_method.get(b, []), b_untrained=untrained)
        if diff:
            seeds = seeds_to_detect(diff["per_seed"])
            differ = f"{100 * diff['discordant']:.1f}% | {questions_to_detect(diff['discordant']):,}"
            lines.append(f"| {a} − {b} | {difference_cells(diff)} | {differ} | {seeds or '-'} |")
    lines += task_differences(by_method, config)
    lines += paper_table(by_method, config)
    lines += ["", *header("method", *SPECIALISATION.values())]
    for method, runs in by_method.items():
        runs = [r["specialisation"] for r in runs if "specialisation" in r]
        if runs:
            cells = [mean_spread([r[key] for r in runs if key in r], 4) for key in SPECIALISATION]
            lines.append(f"| {method} (n={len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def task_differences(by_method: dict[str, list[dict]], config: dict[str, Any]) -> list[str]:
    """Each trained comparison task by task: the mean of the per-seed differences and its 95% interval over
    seeds (Student's t; none with one seed). Where a method helps is often one task, not the average."""
    tasks, rows = config["eval_tasks"], []
    for a, b in config["comparisons"]:
        if config["methods"].get(b, {}) is None or a not in by_method or b not in by_method:
            continue
        per_task = [seed_means(paired_answers(by_method[a], by_method[b], tasks=[task])) for task in tasks]
        if per_task[0]:  # the same seeds pair on every task
            cells = [f"{100 * statistics.mean(m):+.1f} {interval(seed_interval(m))}" for m in per_task]
            rows.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", *header("comparison, by task (95% CI over seeds)", *tasks), *rows]


def load_config(path: str | Path, variant: str | None) -> dict[str, Any]:
    """The full setting of a reproduce config with a variant section's keys laid over it."""
    loaded = yaml.safe_load(Path(path).read_text())
    variants = sorted(set(loaded) - {"methods", "full"})
    if variant is not None and variant not in variants:
        raise ValueError(f"--variant {variant!r}: not a section of {path}; valid: {', '.join(variants)}")
    config = {**loaded["full"], **(loaded[variant] if variant else {})}
    unknown = [name for name in config["methods"] if name not in loaded["methods"]]
    if unknown:
        raise ValueError(f"methods: {unknown} not defined under methods: in {path}")
    config["methods"] = {name: loaded["methods"][name] for name in config["methods"]}
    return config


def paper_table(by_method: dict[str, list[dict]], config: dict[str, Any]) -> list[str]:
    """Every trained method against the config's `reference` method (LoRA), in the shape of the CoMoE
    paper's Table 1 (arXiv 2505.17553): trainable parameters, seeds run, task accuracies and their average
    (means over the method's seeds), the paired difference from the reference on seed 0 alone (the seed
    every method has first) and over every seed both ran (points; 95% intervals over questions, over the
    method's own seeds (t), and over seeds with the seed-to-seed spread pooled over every method
    (`stats.pooled_seed_intervals`: the one interval that both includes the seeds' spread and exists for a
    method run on one or two seeds); seed by seed), and the paper's multi-task average (`paper_averages`,
    LLaMA-2 7B) where the paper has the method. Empty without `reference` or before the reference has a
    run."""
    reference, papers = config.get("reference"), config.get("paper_averages", {})
    if reference not in by_method:
        return []
    tasks = config["eval_tasks"]
    trained = {m: runs for m, runs in by_method.items() if config["methods"][m] is not None}
    every = {m: paired_difference(rs, by_method[reference]) for m, rs in trained.items() if m != reference}
    pooled = pooled_seed_intervals({m: diff["per_seed"] for m, diff in every.items() if diff})
    lines = [
        "",
        *header(
            f"method (− {reference}: paired by seed and question)",
            "trainable parameters",
            "seeds",
            *tasks,
            "average",
            f"− {reference}, seed 0 [95% CI, questions]",
            f"− {reference}, every seed",
            "95% CI, questions",
            "95% CI, seeds (t)",
            "95% CI, seeds (pooled spread)",
            "per seed",
            "paper's average",
        ),
    ]
    for method, runs in trained.items():
        recorded = median_cell(runs, "trainable_params", 0)
        counted = counted_parameters(config["methods"][method], config) if recorded == "-" else None
        cells = [recorded if counted is None else f"{counted:,}", str(len(runs))]
        cells += [f"{100 * statistics.mean(r['accuracy'][task] for r in runs):.1f}" for task in tasks]
        cells.append(f"{100 * statistics.mean(r['average'] for r in runs):.1f}")
        first = paired_difference([r for r in runs if r["seed"] == 0], by_method[reference])
        diff = every.get(method)
        cells.append(f"{100 * first['mean']:+.1f} {interval(first['ci95'])}" if first and diff else "-")
        if diff:
            per_seed = ", ".join(f"{100 * d:+.1f}" for d in diff["per_seed"])
            cells += [f"{100 * diff['mean']:+.1f}", interval(diff["ci95"]), interval(diff["seed_ci95"])]
            cells += [interval(pooled.get(method)), per_seed]
        else:
            cells += ["-"] * 5
        cells.append(str(papers.get(method, "-")))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def load_runs(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def reproduce(
    config: dict[str, Any],
    results_path: Path,
    work: Path,
    run: bool = True,
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
) -> str:
    """Run every (method, seed) not yet in results_path (unless `run` is False), saving after each; write
    and return the summary tables.

    `seeds` / `methods` restrict what this call runs (the tables still cover the whole variant), so that
    several workers can share one results file: each re-reads it before a run and adds its result under a
    lock (`save_run`), and none overwrites another's.

    `compare_with: <variant>` names a variant with the same test questions and another training budget:
    its untrained runs are reused (the same deterministic evaluation) and each method is compared with
    itself there, paired by seed."""
    other = config.get("compare_with")
    other_runs = load_runs(results_path.with_name(f"reproduce-{other}.json")) if other else []
    chosen = {m: s for m, s in config["methods"].items() if methods is None or m in methods}
    for seed in (config["seeds"] if seeds is None else seeds) if run else []:
        for method, spec in chosen.items():
            done = load_runs(results_path)
            if any(r["method"] == method and (r["seed"] == seed or spec is None) for r in done):
                continue  # untrained: evaluation is deterministic, one run serves every seed
            print(f"== {method}, seed {seed}")
            same = [r for r in other_runs if r["method"] == method] if spec is None else []
            save_run(
                results_path,
                config,
                {**same[0], "from_variant": other} if same else run_method(method, spec, seed, config, work),
            )
    results = load_runs(results_path)
    table = summarise(results, config) + budget_table(results, other_runs, config)
    atomic_write_text(results_path.with_suffix(".md"), table)
    return table


def save_run(results_path: Path, config: dict[str, Any], run: dict) -> None:
    """Add one finished run to the results file, re-read under an exclusive lock so that concurrent
    workers never drop each other's runs; a (method, seed) already there is kept, not duplicated."""
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with open(results_path.with_name(f".{results_path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_runs(results_path)
        if not any(r["method"] == run["method"] and r["seed"] == run["seed"] for r in results):
            results.append(run)
        atomic_write_text(results_path, results_json(config, results))


def results_json(config: dict[str, Any], runs: list[dict]) -> str:
    """The results file's text: the config indented, each run on one compact line (a run's per-question
    answers are thousands of booleans; indented one per line they made the file 2.9x larger)."""
    lines = ",\n".join(json.dumps(run, separators=(",", ":")) for run in runs)
    return f'{{"config": {json.dumps(config, indent=2)},\n"runs": [\n{lines}\n]}}\n'


def budget_table(results: list[dict], other_runs: list[dict], config: dict[str, Any]) -> str:
    """Each trained method against itself in the `compare_with` variant (paired by seed and question)."""
    lines = []
    for method, spec in config["methods"].items():
        mine = [r for r in results if r["method"] == method]
        diff = paired_difference(mine, [r for r in other_runs if r["method"] == method]) if spec else {}
        if diff:
            lines.append(f"| {method} | {difference_cells(diff)} |")
    if not lines:
        return ""
    title = f"this budget − {config['compare_with']}"
    return "\n" + "\n".join([*header("method", title, *DIFFERENCE_COLUMNS[1:]), *lines]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(HERE / "reproduce.yaml"))
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--variant", help="a section of the config overriding the full setting, e.g. math")
    variant.add_argument(
        "--quick", action="store_const", const="quick", dest="variant", help="--variant quick (~15 minutes)"
    )
    parser.add_argument("--workdir", default="runs/reproduce", help="training runs and analyses")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where the JSON and table go")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables only")
    parser.add_argument(
        "--seeds", type=comma_list(int), help="run only these seeds, e.g. 1,2 (one worker per seed set)"
    )
    parser.add_argument("--methods", type=comma_list(str), help="run only these methods, e.g. lora,comoe")
    args = parser.parse_args()
    try:
        config = load_config(args.config, args.variant)
    except ValueError as error:
        parser.error(str(error))
    name = f"reproduce-{args.variant}" if args.variant else "reproduce"
    results_path = Path(args.results_dir) / f"{name}.json"
    unknown = sorted(set(args.methods or []) - set(config["methods"]))
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not among the config's {', '.join(config['methods'])}")
    work = Path(args.workdir) / name
    print(reproduce(config, results_path, work, not args.tables_only, args.seeds, args.methods))


def comma_list(item: type) -> Any:
    """argparse type: "1,2" -> [1, 2]."""
    return lambda text: [item(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    main()
