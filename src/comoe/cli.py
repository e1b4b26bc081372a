"""The `comoe` command line: train, eval, analyze, demo."""

from __future__ import annotations

import argparse
import os
import sys

from comoe.train import METHODS, NonFiniteLoss, TrainArgs

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, NonFiniteLoss)


def _tasks(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="fine-tune a base model with a comoe preset or PEFT LoRA")
    train.add_argument("--config", help="YAML file with the same keys as the flags (flags override it)")
    train.add_argument("--model", help="base model: smollm2-135m (default), a local folder or a hub id")
    train.add_argument("--preset", choices=METHODS, help="method (default: comoe)")
    train.add_argument(
        "--data-dir", help="LLM-Adapters checkout or its dataset/ folder (default: built-in tasks)"
    )
    train.add_argument("--tasks", type=_tasks, help="comma-separated training tasks")
    train.add_argument("--train-limit", type=int, help="examples per task")
    train.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    train.add_argument("--epochs", type=float, help="passes over the data (default: 1)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4)")
    train.add_argument("--batch-size", type=int, help="examples per micro-batch (default: 8)")
    train.add_argument("--grad-accum", type=int, help="micro-batches per step (default: 1)")
    train.add_argument("--cutoff", type=int, help="maximum tokens per example (default: 256)")
    train.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: 50)")
    train.add_argument("--stats-steps", type=int, help="log routing statistics every N steps (default: 10)")
    train.add_argument("--seed", type=int, help="seed (default: 0)")
    train.add_argument("--output", help="run directory (default: runs/train)")
    train.add_argument(
        "--resume", action="store_true", default=None, help="continue from the last checkpoint"
    )
    train.add_argument("--skip-nonfinite", action="store_true", default=None, help="skip non-finite batches")
    train.add_argument(
        "--fsdp", action="store_true", default=None, help="shard the base with FSDP2 (torchrun)"
    )


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a base model, with or without an adapter, per task")
    evaluate.add_argument("--model", default="smollm2-135m", help="base model (default: smollm2-135m)")
    evaluate.add_argument("--adapter", help="a comoe or PEFT adapter folder")
    evaluate.add_argument(
        "--data-dir", help="LLM-Adapters checkout or its dataset/ folder (default: built-in)"
    )
    evaluate.add_argument("--tasks", type=_tasks, help="comma-separated test tasks")
    evaluate.add_argument("--limit", type=int, help="examples per task (a seeded sample)")
    evaluate.add_argument(
        "--mode",
        choices=["loglik", "generate"],
        default="loglik",
        help="choice tasks: option log-likelihood (default) or generation",
    )
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument(
        "--max-new-tokens", type=int, help="generation length (default: 256 math, 32 other)"
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--output", help="write the report JSON here")


def _add_analyze(commands) -> None:
    analyze = commands.add_parser("analyze", help="measure expert specialisation of a comoe adapter")
    analyze.add_argument("--model", default="smollm2-135m", help="base model (default: smollm2-135m)")
    analyze.add_argument("--adapter", required=True, help="a comoe adapter folder")
    analyze.add_argument(
        "--data-dir", help="LLM-Adapters checkout or its dataset/ folder (default: built-in)"
    )
    analyze.add_argument("--tasks", type=_tasks, help="comma-separated tasks (test splits)")
    analyze.add_argument("--limit", type=int, default=50, help="examples per task (default: 50)")
    analyze.add_argument("--batch-size", type=int, default=8)
    analyze.add_argument("--output", required=True, help="folder for summary.json, report.md and figures")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comoe", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands)
    _add_eval(commands)
    _add_analyze(commands)
    demo = commands.add_parser(
        "demo", help="fine-tune SmolLM2-135M on built-in tasks, evaluate, write a report"
    )
    demo.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--max-steps", type=int, default=120, help="training steps (default: 120)")
    demo.add_argument("--limit", type=int, default=40, help="test examples per task (default: 40)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            from comoe.train import train

            overrides = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "config")}
            run = train(TrainArgs.from_sources(args.config, overrides))
            if os.environ.get("RANK", "0") == "0":
                print(f"adapter saved to {run / 'adapter'}")
        elif args.command == "eval":
            from comoe.evaluate import run_eval

            report = run_eval(
                args.model,
                args.adapter,
                args.data_dir,
                args.tasks,
                args.limit,
                args.mode,
                args.batch_size,
                args.max_new_tokens,
                args.seed,
                args.output,
            )
            for name, row in report["tasks"].items():
                low, high = row["ci95"]
                interval = f"95% CI {100 * low:.1f}-{100 * high:.1f}"
                print(f"{name:22s} {100 * row['accuracy']:5.1f}%  (n={row['n']}, {interval})")
            print(f"{'average':22s} {100 * report['average']:5.1f}%   ({report['seconds']} s)")
        elif args.command == "analyze":
            from comoe.analysis import analyze

            summary = analyze(
                args.model, args.adapter, args.data_dir, args.tasks, args.limit, args.output, args.batch_size
            )
            print(
                f"I(task; expert) {summary['mean_mi_task_expert_bits']:.4f} bits "
                f"({100 * summary['mean_nmi_task_expert']:.2f}% of H(task)), expert similarity "
                f"{summary['mean_expert_similarity']:.4f}, load CV {summary['mean_load_cv']:.3f}"
            )
        else:
            from comoe.demo import run_demo

            run_demo(output=args.output, max_steps=args.max_steps, limit=args.limit)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"comoe: error: {error} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
