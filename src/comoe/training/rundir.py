"""The run directory: created once (or continued with resume), its resolved settings, its log on resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from comoe.files import atomic_write_text
from comoe.training.distributed import World
from comoe.training.settings import TrainArgs


def prepare_run(args: TrainArgs, world: World) -> Path:
    run = Path(args.output)
    if world.is_main:
        if run.exists() and any(run.iterdir()) and not args.resume:
            raise FileExistsError(
                f"--output {run} is not empty: pass --resume to continue it, or pick a new folder"
            )
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", yaml.safe_dump(dataclasses.asdict(args), sort_keys=False))
    world.barrier()
    return run


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows after the checkpoint a run resumes from, so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
    kept = [line for line in rows if json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
