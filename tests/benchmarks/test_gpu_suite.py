"""benchmarks/gpu_suite.py, the script a lent GPU runs first: at tiny shapes on the CPU (--smoke) every
section runs, each method's row is measured against PEFT LoRA's in the same run, a method that fails is
recorded beside the others, and the JSON and markdown land in the results folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow  # a subprocess building eight small models (~20 s)
def test_the_smoke_run_measures_every_section_against_lora(tmp_path):
    command = [sys.executable, str(SCRIPT), "--smoke", "--repeats", "1", "--out", str(tmp_path)]
    command += ["--methods", "lora,comoe,no_such_preset", "--compiled", "none"]
    command += ["--sections", "layer,step smollm2-135m,eval,generation,4bit"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    sections = results["sections"]
    assert set(sections) == {"layer", "step smollm2-135m", "eval", "generation", "4bit"}
    assert results["machine"]["torch"]
    strategies = {row["strategy"]: row for row in sections["layer"]["rows"]}
    assert {"blocks", "grouped", "lora r=32"} <= set(strategies)
    assert strategies["lora r=32"]["over_lora"] == 1.0 and strategies["blocks"]["median_ms"] > 0
    for name in ("step smollm2-135m", "eval", "generation"):
        rows = {row["method"]: row for row in sections[name]["rows"]}
        assert rows["lora"]["over_lora"] == 1.0 and rows["comoe"]["over_lora"] > 0
        assert "not a preset" in rows["no_such_preset"]["error"] or "unknown" in rows["no_such_preset"]["error"]
    step = {row["method"]: row for row in sections["step smollm2-135m"]["rows"]}
    assert step["comoe"]["ops"] > step["lora"]["ops"] > 0  # the mixture dispatches more than LoRA
    assert "skipped" in sections["4bit"]["rows"][0]  # CUDA only
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "## step smollm2-135m" in table and "| comoe |" in table
