"""Settings of `comoe train`: one dataclass, read from flags and/or a YAML file with the same keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from comoe.config import PRESETS
from comoe.settings import load_settings, setting

METHODS = [*PRESETS, "lora"]


@dataclass
class TrainArgs:
    """Settings of `comoe train`; the same keys are accepted in a YAML file given with --config."""

    renamed_keys: ClassVar[dict[str, str]] = {"adapter": "adapter_config"}  # older YAML files and runs

    model: str = setting("smollm2-135m", "base model: alias, local folder or hub id")
    preset: str = setting("comoe", "method", choices=METHODS)
    adapter_config: dict[str, Any] = setting(
        {}, "ComoeConfig overrides on top of the preset (YAML only; key 'adapter' in older files)", flag=False
    )
    data_dir: str | None = setting(None, "LLM-Adapters checkout (default: built-in)")
    tasks: list[str] | None = setting(None, "training tasks (comma list on the CLI)")
    train_limit: int | None = setting(None, "examples per task (seeded sample)")
    max_steps: int | None = setting(None, "optimizer steps (overrides epochs)")
    epochs: float = setting(1.0, "passes over the training mixture")
    lr: float = setting(2e-4, "peak learning rate (AdamW)")
    warmup_steps: int = setting(10, "linear warmup steps, then linear decay to 0")
    batch_size: int = setting(8, "examples per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    cutoff: int = setting(256, "maximum tokens per example (longer ones are cut)")
    max_grad_norm: float = setting(1.0, "gradient clipping (0 disables)")
    seed: int = setting(0, "seed for the adapter init, data order and dropout")
    save_steps: int = setting(50, "checkpoint every N steps (0: only at the end)")
    stats_steps: int = setting(10, "log routing statistics (load, I(task; expert)) every N steps (0: never)")
    output: str = setting("runs/train", "run directory")
    resume: bool = setting(False, "continue from the run directory's last checkpoint")
    skip_nonfinite: bool = setting(False, "skip batches with a non-finite loss")
    fsdp: bool = setting(False, "with several processes, shard the base model with FSDP2 (comoe presets)")

    def __post_init__(self) -> None:
        if self.preset not in METHODS:
            raise ValueError(f"preset={self.preset!r} is invalid: expected one of {', '.join(METHODS)}")
        for name in ("batch_size", "grad_accum", "cutoff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected an integer >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps!r} is invalid: expected an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is invalid: expected a number > 0")
        if self.fsdp and (self.resume or self.preset == "lora"):
            raise ValueError(
                "fsdp=True is invalid with resume or preset 'lora': FSDP runs save the final comoe adapter "
                "only (no resumable checkpoints yet); use DDP (the default) for those"
            )

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> TrainArgs:
        """Defaults, then the YAML file, then explicit overrides (command-line flags)."""
        return load_settings(cls, config_file, overrides)
