"""Settings of `comoe eval`: one dataclass, read from flags and/or a YAML file with the same keys."""

from __future__ import annotations

from dataclasses import dataclass

from comoe.settings import setting
from comoe.validation import check_choice, check_int

MODES = ("loglik", "generate")


@dataclass
class EvalArgs:
    """What to evaluate (base model, optional adapter), on which tasks, how, and where the report goes."""

    model: str = setting("smollm2-135m", "base model: alias, local folder or hub id")
    adapter: str | None = setting(None, "a comoe or PEFT adapter folder (default: the base model alone)")
    data_dir: str | None = setting(None, "LLM-Adapters checkout or its dataset/ folder (default: built-in)")
    tasks: list[str] | None = setting(None, "test tasks (comma list on the CLI)")
    limit: int | None = setting(None, "examples per task (a seeded sample)")
    mode: str = setting("loglik", "choice tasks: option log-likelihood or generation", choices=MODES)
    batch_size: int = setting(8, "questions per forward (loglik; their options together), prompts (generate)")
    max_new_tokens: int | None = setting(None, "generation length (default: 256 for math, 32 otherwise)")
    seed: int = setting(0, "seed of the per-task sample")
    output: str | None = setting(None, "write the report JSON here")

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_int("batch_size", self.batch_size, low=1)
        if self.limit is not None:
            check_int("limit", self.limit, low=1)
        if self.max_new_tokens is not None:
            check_int("max_new_tokens", self.max_new_tokens, low=1)
