"""Settings of `comoe analyze`: one dataclass, read from flags and/or a YAML file with the same keys."""

from __future__ import annotations

from dataclasses import dataclass

from comoe.settings import DEVICE_HELP, DTYPES, DataArgs, check_field_types, check_placement, setting
from comoe.validation import check_int


@dataclass
class AnalyzeArgs(DataArgs):
    """Which comoe adapter to analyse, on which held-out examples (LLM-Adapters, built-in, or your files
    with --data, grouped by their tasks), and where the results go."""

    adapter: str | None = setting(None, "a comoe adapter folder (required)")
    output: str | None = setting(None, "folder for summary.json, report.md and figures (required)")
    model: str | None = setting(
        None,
        "base model: alias, local folder or hub id (default: the one the adapter records, else smollm2-135m)",
    )
    dtype: str = setting("float32", "the base model's dtype", choices=DTYPES)
    device: str = setting("auto", DEVICE_HELP)
    data_dir: str | None = setting(None, "LLM-Adapters checkout or its dataset/ folder (default: built-in)")
    tasks: list[str] | None = setting(None, "tasks whose test splits are routed (comma list on the CLI)")
    limit: int | None = setting(50, "examples per task (a seeded sample)")
    batch_size: int = setting(8, "examples per forward")
    cutoff: int = setting(256, "maximum tokens per example")
    seed: int = setting(0, "seed of the per-task sample")

    def __post_init__(self) -> None:
        self.check_data()
        check_placement(self)
        for name in ("adapter", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required (--{name} on the command line)")
        check_field_types(self)  # after `required`, which an empty adapter or output is told first
        check_int("batch_size", self.batch_size, low=1)
        check_int("cutoff", self.cutoff, low=1)
        if self.limit is not None:
            check_int("limit", self.limit, low=1)
