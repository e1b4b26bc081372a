"""Settings of `comoe train`: one dataclass, read from flags and/or a YAML file with the same keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from comoe.config import BASELINES, PRESETS, ComoeConfig
from comoe.settings import (
    DEVICE_HELP,
    DTYPES,
    LOAD_IN_4BIT_HELP,
    LOAD_IN_8BIT_HELP,
    DataArgs,
    check_field_types,
    check_placement,
    load_settings,
    setting,
)
from comoe.validation import InvalidSetting, check_choice, check_int, check_number, fail

METHODS = [*PRESETS, *BASELINES]


@dataclass
class TrainArgs(DataArgs):
    """Settings of `comoe train`; the same keys are accepted in a YAML file given with --config."""

    renamed_keys: ClassVar[dict[str, str]] = {"adapter": "adapter_config"}  # older YAML files and runs

    model: str = setting("smollm2-135m", "base model: alias, local folder or hub id")
    preset: str = setting("comoe", "method", choices=METHODS)
    dtype: str = setting(
        "float32",
        "the base model's dtype (experts stay in adapter_dtype, float32 by default)",
        choices=DTYPES,
    )
    device: str = setting("auto", DEVICE_HELP)
    load_in_4bit: bool = setting(False, LOAD_IN_4BIT_HELP)
    load_in_8bit: bool = setting(False, LOAD_IN_8BIT_HELP)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    compile: bool = setting(
        False, "torch.compile each decoder block (values and gradients equal eager's; step 1 compiles)"
    )
    adapter_config: dict[str, Any] = setting(
        {}, "ComoeConfig overrides on top of the preset (YAML only; key 'adapter' in older files)", flag=False
    )
    data_dir: str | None = setting(None, "LLM-Adapters checkout (default: built-in)")
    tasks: list[str] | None = setting(None, "training tasks (comma list on the CLI)")
    train_limit: int | None = setting(None, "examples per task (seeded sample)")
    max_steps: int | None = setting(None, "optimizer steps (overrides epochs)")
    epochs: float = setting(1.0, "passes over the training mixture")
    lr: float = setting(2e-4, "peak learning rate (AdamW)")
    router_lr_ratio: float = setting(
        1.0, "the routers' learning rate as a multiple of lr (as LoRA+ scales B's); comoe presets only"
    )
    warmup_steps: int = setting(10, "linear warmup steps, then linear decay to 0")
    batch_size: int = setting(8, "examples per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    cutoff: int = setting(256, "maximum tokens per example (longer ones are cut)")
    max_grad_norm: float = setting(1.0, "gradient clipping (0 disables)")
    seed: int = setting(0, "seed for the adapter init, data order and dropout")
    save_steps: int = setting(50, "checkpoint every N steps (0: only at the end)")
    stats_steps: int = setting(10, "log routing statistics (load, I(task; expert)) every N steps (0: never)")
    eval_data: list[str] | None = setting(
        None, "validation data, [name=]path as --data (its loss is logged every --eval-steps)", repeat=True
    )
    val_fraction: float = setting(0.0, "hold out this fraction of each training task for validation (seeded)")
    eval_steps: int = setting(50, "validation loss every N steps and at the end (0: only at the end)")
    save_best: bool = setting(False, "keep the adapter with the lowest validation loss in best-adapter/")
    output: str = setting("runs/train", "run directory")
    resume: bool = setting(False, "continue from the run directory's last checkpoint")
    skip_nonfinite: bool = setting(False, "skip batches with a non-finite loss")
    fsdp: bool = setting(False, "with several processes, shard the base model with FSDP2 (comoe presets)")

    def __post_init__(self) -> None:
        check_field_types(self)
        self.check_data()
        check_choice("preset", self.preset, METHODS)
        check_placement(self)
        for name in ("batch_size", "grad_accum", "cutoff"):
            check_int(name, getattr(self, name), low=1)
        for name in ("warmup_steps", "save_steps", "stats_steps", "seed", "eval_steps"):
            check_int(name, getattr(self, name), low=0)
        for name in ("max_steps", "train_limit"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1)
        check_number("epochs", self.epochs, low=0.0, low_open=True)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("router_lr_ratio", self.router_lr_ratio, low=0.0, low_open=True)
        check_number("val_fraction", self.val_fraction, low=0.0, high=1.0)
        if self.eval_data == []:  # `eval_data: []` in YAML: not "no validation"
            fail("eval_data", [], "at least one [name=]path (leave eval_data out for no validation)")
        if self.eval_data and self.val_fraction:
            raise ValueError("eval_data and val_fraction are exclusive: give one source of validation data")
        if self.save_best and not (self.eval_data or self.val_fraction):
            raise ValueError("save_best needs validation data: give --eval-data or --val-fraction")
        check_number("max_grad_norm", self.max_grad_norm, low=0.0)
        self.comoe_config()  # the adapter overrides are checked here, before any model is loaded
        if self.fsdp and (self.resume or self.preset in BASELINES):
            baselines = " or ".join(repr(name) for name in BASELINES)
            raise ValueError(
                f"fsdp=True is invalid with resume or preset {baselines}: FSDP runs save the final comoe "
                "adapter only (no resumable checkpoints yet); use DDP (the default) for those"
            )

    def comoe_config(self) -> ComoeConfig:
        """The adapter this run trains: the preset plus adapter_config overrides (for a PEFT baseline, 'lora'
        or 'dora', the comoe preset whose trainable-parameter count its rank matches)."""
        preset = BASELINES.get(self.preset, self.preset)
        try:
            return ComoeConfig.from_preset(preset, self.adapter_config, where="adapter_config")
        except InvalidSetting as error:
            raise InvalidSetting("adapter_config", f"adapter_config: {error}") from None
        except TypeError as error:  # a field given with a wrong keyword shape
            raise InvalidSetting("adapter_config", f"adapter_config: {error}") from None

    # Settings that may differ when a run is resumed: where files go and how often it reports.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset(
        {"output", "resume", "save_steps", "stats_steps", "eval_steps"}
    )

    @classmethod
    def from_sources(cls, config_file: str | None, overrides: dict[str, Any]) -> TrainArgs:
        """Defaults, then the YAML file, then explicit overrides (command-line flags)."""
        return load_settings(cls, config_file, overrides)
