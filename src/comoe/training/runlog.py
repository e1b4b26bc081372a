"""What a run reports while it trains: log.jsonl rows, TensorBoard scalars and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter
from tqdm.auto import tqdm


class RunLog:
    """log.jsonl, TensorBoard and the progress bar, written by the main process only."""

    def __init__(self, run: Path, total: int, step: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.file = open(run / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.writer = SummaryWriter(str(run / "tensorboard"))
        self.progress = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any], components: list[str] | tuple[str, ...] = ("task",)) -> None:
        """One step's row; the progress bar shows the loss `components` it names (task, balance, ...)."""
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for name, value in record.items():
            if name != "step":  # val_loss, val_loss/<task> -> validation/loss, validation/loss/<task>
                tag = f"validation/{name[4:]}" if name.startswith("val_") else f"train/{name}"
                self.writer.add_scalar(tag, value, record["step"])
        self.progress.update(1)
        self.progress.set_postfix({name: f"{record[name]:.3f}" for name in components if name in record})

    def close(self) -> None:
        if self.enabled:
            self.progress.close()
            self.writer.close()
            self.file.close()
