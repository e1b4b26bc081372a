"""benchmarks/select_on_validation.py: a setting (here the contrastive weight) is chosen per seed on validation
accuracy alone, and the chosen runs are compared with moe by the reproduction's paired difference."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "select_on_validation.py"
spec = importlib.util.spec_from_file_location("select_on_validation", SCRIPT)
select_on_validation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(select_on_validation)
sys.path.remove(str(SCRIPT.parent))  # put there to import reproduce; benchmarks/common.py must not shadow


def run(method: str, seed: int, correct: list[bool]) -> dict:
    return {"method": method, "seed": seed, "correct": {"t": correct}, "average": sum(correct) / len(correct)}


def test_lambda_is_chosen_on_validation_not_test_and_validations_are_kept():
    runs = [
        run("comoe", 0, [True, True]),  # best on test at seed 0, but worse on validation
        run("comoe_w0.1", 0, [False, True]),
        run("comoe", 1, [False, False]),
        run("comoe_w0.1", 1, [True, False]),
        run("comoe", 2, [True, True]),  # seed 2 lacks its lambda = 0.1 run: not selected
        run("moe", 0, [False, False]),
        run("moe", 1, [False, False]),
    ]
    validation = {"comoe-seed0": 0.3, "comoe_w0.1-seed0": 0.5, "comoe-seed1": 0.6, "comoe_w0.1-seed1": 0.2}
    state = {"validation": {"comoe-seed0": 0.3}}  # kept from an earlier call: not evaluated again
    asked, saves = [], []

    def validate(name: str) -> float:
        asked.append(name)
        return validation[name]

    candidates = select_on_validation.CHOICES["lambda"][1]
    select_on_validation.select(
        runs, candidates, state, validate, lambda: saves.append(dict(state["validation"]))
    )
    assert asked == ["comoe_w0.1-seed0", "comoe-seed1", "comoe_w0.1-seed1"] and len(saves) == 3
    assert state["chosen"] == {"0": 0.1, "1": 0.01}
    assert state["test_average"] == {"0": 0.5, "1": 0.0}
    # chosen: seed 0 comoe_w0.1 (1 of 2) and seed 1 comoe (0 of 2) against moe (0 of 2 each)
    assert state["differences"]["moe"]["mean"] == pytest.approx(1 / 4)
    assert state["differences"]["lora"] == {}
    assert "| 0 | 30.0 | 50.0 | 0.1 | 50.0 |" in select_on_validation.table("lambda", candidates, state)
