"""Settings of `comoe demo`."""

from __future__ import annotations

from dataclasses import dataclass

from comoe.settings import check_field_types, setting
from comoe.validation import check_int


@dataclass
class DemoArgs:
    """The demo: a short CoMoE run on the built-in tasks, then base vs fine-tuned evaluation."""

    output: str = setting("runs/demo", "run directory (replaced if it exists)")
    max_steps: int = setting(120, "training steps")
    limit: int = setting(40, "test examples per task")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_int("max_steps", self.max_steps, low=1)
        check_int("limit", self.limit, low=1)
