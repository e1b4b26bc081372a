"""Start-up cost of the command line and the library: wall seconds of fresh processes, median of
interleaved repeats, against the bare interpreter and `import torch` measured in the same run.

    python benchmarks/bench_startup.py [--quick] [--json FILE]

`comoe --help` must not load torch (target < 1 s); the cached SmolLM2-135M reload is what every train,
eval and analyze run pays before its first step.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from common import interleaved_medians, save_results

PYTHON = sys.executable
COMOE = shutil.which("comoe", path=str(Path(PYTHON).parent)) or "comoe"

CANDIDATES = {
    "python -c pass (interpreter)": [PYTHON, "-c", "pass"],
    "import torch (reference)": [PYTHON, "-c", "import torch"],
    "comoe --help": [COMOE, "--help"],
    "comoe train --help": [COMOE, "train", "--help"],
    "import comoe": [PYTHON, "-c", "import comoe"],
    "from comoe import ComoeModel": [PYTHON, "-c", "from comoe import ComoeModel"],
    "load_base('smollm2-135m') (cached)": [
        PYTHON,
        "-c",
        "from comoe.models import load_base; load_base('smollm2-135m')",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, no model reload")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    candidates = dict(CANDIDATES)
    if args.quick:
        candidates.pop("load_base('smollm2-135m') (cached)")
    repeats = 3 if args.quick else args.repeats

    def runner(command: list[str]):
        return lambda: subprocess.run(command, check=True, capture_output=True)

    medians = interleaved_medians({name: runner(cmd) for name, cmd in candidates.items()}, repeats)
    base = medians["python -c pass (interpreter)"]
    torch_import = medians["import torch (reference)"]
    print(f"{'command':40s} {'median s':>9s} {'- interpreter':>14s} {'/ import torch':>15s}")
    for name, seconds in medians.items():
        print(f"{name:40s} {seconds:9.3f} {seconds - base:14.3f} {seconds / torch_import:15.2f}")
    save_results(args.json, {"repeats": repeats, "median_seconds": medians})


if __name__ == "__main__":
    main()
