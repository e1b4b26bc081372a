"""comoe.recipes.demo: the demo's train -> evaluate base and adapter -> eval.json and report.md, with
training and evaluation replaced by stand-ins that record what they were asked (no model is loaded)."""

import json
import logging
from pathlib import Path

import pytest

from comoe.errors import NonFiniteLoss
from comoe.evaluation.scoring import wilson_interval
from comoe.recipes import demo
from comoe.recipes.report import REPORT_NAME, accuracy_table
from comoe.recipes.settings import DemoArgs


def evaluation(correct: int, n: int = 4) -> dict:
    task = {"accuracy": correct / n, "n": n, "ci95": wilson_interval(correct, n), "truncated": 0}
    return {"tasks": {"chain_sum": task}, "average": correct / n, "mode": "generate", "predictions": []}


@pytest.fixture
def stand_ins(monkeypatch):
    calls = {"train": [], "eval": []}

    def train(args):
        calls["train"].append(args)
        run = Path(args.output)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"preset: {args.preset}\nmax_steps: {args.max_steps}\n")
        rows = [
            {"step": s, "task": 1.0 / s, "balance": 0.0, "contrastive": 0.1, "lr": 1e-3, "tokens_per_s": 50.0}
            for s in (1, 2)
        ]
        (run / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (run / "adapter").mkdir()
        return run

    def run_eval(args):
        calls["eval"].append(args)
        return evaluation(1 if args.adapter is None else 3)

    monkeypatch.setattr(demo, "train", train)
    monkeypatch.setattr(demo, "run_eval", run_eval)
    return calls


def test_the_demo_trains_evaluates_both_models_and_writes_its_files(tmp_path, stand_ins):
    run = demo.run_demo(DemoArgs(output=str(tmp_path / "demo"), max_steps=7, limit=5))
    assert run == tmp_path / "demo"
    (args,) = stand_ins["train"]
    assert (args.preset, args.max_steps, args.lr, args.batch_size, args.save_steps) == (
        "comoe",
        7,
        1e-3,
        8,
        60,
    )
    assert args.output == str(run) and args.model == "smollm2-135m"
    base, tuned = stand_ins["eval"]
    for evaluated, adapter in ((base, None), (tuned, str(run / "adapter"))):
        assert (evaluated.model, evaluated.adapter, evaluated.limit) == (args.model, adapter, 5)
        assert (evaluated.mode, evaluated.batch_size) == ("generate", 16)
    assert json.loads((run / "eval.json").read_text()) == {"base": evaluation(1), "fine_tuned": evaluation(3)}
    table = accuracy_table(run / REPORT_NAME)
    assert "| chain_sum | 4 | - | - | 25.0 (" in table and "| **average** | | | | 25.0 | 75.0 | +50.0 |" in table


def test_a_previous_demo_run_is_replaced(tmp_path, stand_ins, caplog):
    old = tmp_path / "demo"
    old.mkdir()
    (old / "stale.txt").write_text("from an earlier run")
    with caplog.at_level(logging.INFO, logger="comoe"):
        run = demo.run_demo(DemoArgs(output=str(old), max_steps=1, limit=1))
    assert not (run / "stale.txt").exists()
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter",
        "config.yaml",
        "eval.json",
        "log.jsonl",
        REPORT_NAME,
    ]
    assert f"replacing the previous demo run in {old}" in caplog.text


def test_a_failed_training_writes_no_report(tmp_path, stand_ins, monkeypatch):
    def diverged(args):
        raise NonFiniteLoss("step 1: non-finite task loss")

    monkeypatch.setattr(demo, "train", diverged)
    with pytest.raises(NonFiniteLoss):
        demo.run_demo(DemoArgs(output=str(tmp_path / "demo")))
    assert stand_ins["eval"] == [] and not (tmp_path / "demo" / REPORT_NAME).exists()
