"""The main job: fine-tune SmolLM2-135M with the CoMoE preset on the built-in multi-task mixture, then
evaluate the base model and the adapter per task and write runs/<name>/report.md.

Progress goes to the "comoe" logger; `comoe demo` shows it, and prints the accuracy table of the report.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from comoe.evaluation.runner import run_eval
from comoe.evaluation.settings import EvalArgs
from comoe.files import atomic_write_text
from comoe.recipes.report import write_report
from comoe.recipes.settings import DemoArgs
from comoe.training.loop import train
from comoe.training.settings import TrainArgs

logger = logging.getLogger(__name__)


def run_demo(demo: DemoArgs) -> Path:
    """Train, evaluate the base model and the adapter, write eval.json and report.md into demo.output;
    returns that run directory."""
    run = Path(demo.output)
    if run.exists():
        logger.info(f"replacing the previous demo run in {run}")
        shutil.rmtree(run)
    # A short run: a higher peak learning rate than the LLM-Adapters recipe's 2e-4 (which assumes epochs
    # over 170k examples) so that 120 steps are enough to learn the tasks' answer formats.
    args = TrainArgs(
        preset="comoe", max_steps=demo.max_steps, lr=1e-3, batch_size=8, output=str(run), save_steps=60
    )
    train(args)
    logger.info("evaluating the base model and the fine-tuned adapter on the built-in test split")
    base = run_eval(EvalArgs(model=args.model, limit=demo.limit, mode="generate", batch_size=16))
    adapter = str(run / "adapter")
    tuned = run_eval(
        EvalArgs(model=args.model, adapter=adapter, limit=demo.limit, mode="generate", batch_size=16)
    )
    atomic_write_text(run / "eval.json", json.dumps({"base": base, "fine_tuned": tuned}, indent=2) + "\n")
    write_report(run, base, tuned)
    return run
