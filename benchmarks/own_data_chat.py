"""Your own data, end to end on a real model: SmolLM2-135M-Instruct fine-tuned with its own chat template on
a JSONL file of conversations, validated during training, and evaluated on held-out conversations against
the base model.

    python benchmarks/own_data_chat.py [--workdir runs/own-data-chat] [--train-per-task 100]

The conversations come from the built-in reasoning-gym tasks (system prompt, question, answer), written as
a user would write their own data: train.jsonl and test.jsonl with a `task` field. Training runs through
`comoe train --data` (validation split 10%, best adapter kept); evaluation through `comoe eval --data`
(greedy generation, exact match or number). Resumable: each finished stage is kept in the results JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from comoe.cli import main as comoe
from comoe.data.builtin import builtin_examples
from comoe.files import atomic_write_text

HERE = Path(__file__).resolve().parent
SYSTEM = "Answer with the final answer only."


def write_conversations(path: Path, split: str, per_task: int) -> None:
    rows = [
        {
            "task": e.task,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": e.instruction},
                {"role": "assistant", "content": e.output},
            ],
        }
        for e in builtin_examples(split, per_task)
    ]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def stage(results: dict, name: str, path: Path, run) -> None:
    """Run one stage unless the results already hold it; save the results after it."""
    if name in results:
        return
    start = time.perf_counter()
    results[name] = run()
    results[name + "_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def table(results: dict) -> str:
    base, tuned = results["eval_base"]["tasks"], results["eval_adapter"]["tasks"]
    lines = [
        "| task | n | base model | comoe adapter |",
        "|---|---|---|---|",
    ]
    for task, row in tuned.items():
        cells = []
        for report in (base[task], row):
            low, high = report["ci95"]
            cells.append(f"{100 * report['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
        lines.append(f"| {task} | {row['n']} | {cells[0]} | {cells[1]} |")
    lines.append(
        f"| **average** | | {100 * results['eval_base']['average']:.1f} | "
        f"{100 * results['eval_adapter']['average']:.1f} |"
    )
    curve = ", ".join(f"{row['step']}: {row['val_loss']:.3f}" for row in results["validation"])
    return "\n".join(lines) + f"\n\nValidation loss by step: {curve}\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/own-data-chat")
    parser.add_argument("--train-per-task", type=int, default=100)
    parser.add_argument("--test-per-task", type=int, default=50)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--preset", default="comoe")
    parser.add_argument("--results", default=str(HERE / "results" / "own-data-chat.json"))
    options = parser.parse_args()
    work, results_path = Path(options.workdir), Path(options.results)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    train_file, test_file = work / "train.jsonl", work / "test.jsonl"
    if not train_file.is_file():
        write_conversations(train_file, "train", options.train_per_task)
        write_conversations(test_file, "test", options.test_per_task)
    run = work / "run"
    train_argv = [
        "train",
        "--data",
        str(train_file),
        "--preset",
        options.preset,
        "--val-fraction",
        "0.1",
        "--eval-steps",
        "10",
        "--save-best",
        "--epochs",
        str(options.epochs),
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--save-steps",
        "10",
        "--output",
        str(run),
    ]

    def do_train() -> dict:
        code = comoe([*train_argv, "--resume"] if run.is_dir() else train_argv)
        if code:
            raise SystemExit(f"training failed ({code})")
        return {"command": "comoe " + " ".join(train_argv)}

    stage(results, "train", results_path, do_train)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    results["validation"] = [
        {k: v for k, v in row.items() if k == "step" or k.startswith("val_loss")}
        for row in rows
        if "val_loss" in row
    ]
    for name, adapter in (("eval_base", None), ("eval_adapter", run / "best-adapter")):
        report = work / f"{name}.json"
        argv = ["eval", "--data", str(test_file), "--mode", "generate", "--max-new-tokens", "32"]
        argv += ["--output", str(report)] + (["--adapter", str(adapter)] if adapter else [])

        def do_eval(argv: list[str] = argv, report: Path = report) -> dict:
            if comoe(argv):
                raise SystemExit("evaluation failed")
            summary = json.loads(report.read_text())
            return {
                "tasks": summary["tasks"],
                "average": summary["average"],
                "command": "comoe " + " ".join(argv),
            }

        stage(results, name, results_path, do_eval)
    atomic_write_text(results_path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(results_path.with_suffix(".md"), table(results))
    print(table(results))


if __name__ == "__main__":
    main()
