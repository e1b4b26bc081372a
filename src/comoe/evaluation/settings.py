"""Settings of `comoe eval`: one dataclass, read from flags and/or a YAML file with the same keys."""

from __future__ import annotations

from dataclasses import dataclass

from comoe.settings import (
    DEVICE_HELP,
    DTYPES,
    LOAD_IN_4BIT_HELP,
    LOAD_IN_8BIT_HELP,
    RECORDED_QUANTIZATION_HELP,
    TEMPLATE_CHOICES,
    DataArgs,
    check_field_types,
    check_placement,
    setting,
)
from comoe.validation import check_choice, check_int

MODES = ("loglik", "generate")
SPLITS = ("test", "validation")


@dataclass
class EvalArgs(DataArgs):
    """What to evaluate (base model, optional adapter), on which tasks (LLM-Adapters, built-in, or your
    files with --data: records with choices + answer are scored as multiple choice, others by generation),
    how, and where the report goes. Under --template auto, --data prompts as the adapter was trained."""

    model: str | None = setting(
        None,
        "base model: alias, local folder or hub id (default: the one the adapter records, else smollm2-135m)",
    )
    adapter: str | None = setting(None, "a comoe or PEFT adapter folder (default: the base model alone)")
    dtype: str = setting("float32", "the base model's dtype", choices=DTYPES)
    device: str = setting("auto", DEVICE_HELP)
    load_in_4bit: bool | None = setting(None, LOAD_IN_4BIT_HELP + RECORDED_QUANTIZATION_HELP)
    load_in_8bit: bool | None = setting(None, LOAD_IN_8BIT_HELP + RECORDED_QUANTIZATION_HELP)
    data_dir: str | None = setting(None, "LLM-Adapters checkout or its dataset/ folder (default: built-in)")
    tasks: list[str] | None = setting(None, "test tasks (comma list on the CLI)")
    limit: int | None = setting(None, "examples per task (a seeded sample)")
    split: str = setting(
        "test", "test, or validation (built-in tasks: disjoint from train and test)", choices=SPLITS
    )
    mode: str = setting("loglik", "choice tasks: option log-likelihood or generation", choices=MODES)
    batch_size: int = setting(8, "questions per forward (loglik; their options together), prompts (generate)")
    max_new_tokens: int | None = setting(None, "generation length (default: 256 for math, 32 otherwise)")
    seed: int = setting(0, "seed of the per-task sample")
    output: str | None = setting(None, "write the report JSON here")

    def __post_init__(self) -> None:
        check_field_types(self)
        self.check_data()
        check_placement(self)
        check_choice("mode", self.mode, MODES)
        check_choice("split", self.split, SPLITS)
        check_int("batch_size", self.batch_size, low=1)
        if self.limit is not None:
            check_int("limit", self.limit, low=1)
        if self.max_new_tokens is not None:
            check_int("max_new_tokens", self.max_new_tokens, low=1)


@dataclass
class GenerateArgs:
    """Prompts in, greedy responses out (JSONL), prompted as the adapter was trained (its template)."""

    model: str | None = setting(
        None,
        "base model: alias, local folder or hub id (default: the one the adapter records, else smollm2-135m)",
    )
    adapter: str | None = setting(None, "a comoe or PEFT adapter folder (default: the base model alone)")
    dtype: str = setting("float32", "the base model's dtype", choices=DTYPES)
    device: str = setting("auto", DEVICE_HELP)
    load_in_4bit: bool | None = setting(None, LOAD_IN_4BIT_HELP + RECORDED_QUANTIZATION_HELP)
    load_in_8bit: bool | None = setting(None, LOAD_IN_8BIT_HELP + RECORDED_QUANTIZATION_HELP)
    prompt: str | None = setting(None, "one prompt (the user's turn under the chat template)")
    prompts: str | None = setting(
        None, "a file of prompts: .txt (one per line) or .jsonl (rows with prompt or messages)"
    )
    template: str = setting(
        "auto",
        "prompt template (auto: the one the adapter was trained with, else none)",
        choices=TEMPLATE_CHOICES,
    )
    max_new_tokens: int = setting(128, "tokens to generate per prompt")
    batch_size: int = setting(8, "prompts per generate call")
    output: str | None = setting(None, "write JSONL rows {prompt, response} here (default: print them)")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_placement(self)
        check_choice("template", self.template, TEMPLATE_CHOICES)
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        check_int("batch_size", self.batch_size, low=1)
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of --prompt TEXT or --prompts FILE")
