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
from comoe.validation import check_choice, check_int, fail

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
    adapter: str | list[str] | None = setting(
        None,
        "a comoe or PEFT adapter folder (default: the base model alone); several are evaluated on the same "
        "questions with one base load, one report each and their paired comparison",
        repeat=True,
    )
    with_base: bool = setting(
        False, "also evaluate the base model alone on the same questions (one more report, compared too)"
    )
    dtype: str = setting("float32", "the base model's dtype", choices=DTYPES)
    device: str = setting("auto", DEVICE_HELP)
    compile: bool = setting(
        False, "torch.compile each decoder block before evaluating (the first batches compile)"
    )
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
    output: str | None = setting(
        None,
        "write the report JSON here, its markdown summary (.md) and plot (.png) beside it; with several "
        "models, one report each (<name>.<label>.json) and their comparison (<name>.compare.json)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.adapter, list) and len(self.adapter) == 1:  # --adapter given once: that folder
            self.adapter = self.adapter[0]
        check_field_types(self)
        if isinstance(self.adapter, list):
            if not self.adapter:
                fail("adapter", [], "an adapter folder or a list of them")
            if len(set(self.adapter)) < len(self.adapter):
                repeated = next(a for a in self.adapter if self.adapter.count(a) > 1)
                raise ValueError(f"--adapter {repeated} is given twice; give each adapter folder once")
        self.check_data()
        check_placement(self)
        check_choice("mode", self.mode, MODES)
        check_choice("split", self.split, SPLITS)
        check_int("batch_size", self.batch_size, low=1)
        if self.limit is not None:
            check_int("limit", self.limit, low=1)
        if self.max_new_tokens is not None:
            check_int("max_new_tokens", self.max_new_tokens, low=1)

    @property
    def adapters(self) -> list[str]:
        """The adapter folders to evaluate, in order ([] for the base model alone)."""
        if self.adapter is None:
            return []
        return [self.adapter] if isinstance(self.adapter, str) else list(self.adapter)


@dataclass
class CompareArgs:
    """Paired comparison of `comoe eval` reports of the same questions: per task and over all questions, the
    difference with a 95% paired bootstrap interval, the share of answers that differ and the questions a
    1-point difference needs; with several reports (training seeds) per side, Student's t over seeds."""

    reports: list[str] = setting(
        [],
        "eval report JSONs, one side (model) each; a side's training seeds are joined by commas "
        "(a_s0.json,a_s1.json) or sides are separated by --: a_s0.json a_s1.json -- b_s0.json b_s1.json. "
        "Each later side is compared with each earlier one (later minus earlier: give the reference first)",
        positional=True,
    )
    labels: list[str] | None = setting(None, "names of the sides, in order (default: from the reports)")
    samples: int = setting(2000, "bootstrap resamples")
    seed: int = setting(0, "seed of the bootstrap")
    output: str | None = setting(None, "write the comparison JSON here (and its markdown beside it, .md)")

    def __post_init__(self) -> None:
        check_field_types(self)
        check_int("samples", self.samples, low=100)
        check_int("seed", self.seed, low=0)
        sides = compare_sides(self.reports)
        if len(sides) < 2:
            given = f"got {len(sides)}" + (f": {self.reports[0]}" if sides else "")
            raise ValueError(
                f"reports: give at least two sides to compare (comoe compare A.json B.json), {given}"
            )
        if self.labels is not None and len(self.labels) != len(sides):
            fail("labels", self.labels, f"one label per side ({len(sides)})")


def compare_sides(reports: list[str]) -> list[list[str]]:
    """Each side's reports: one argument per side, its seeds' reports joined by commas."""
    return [[path.strip() for path in item.split(",") if path.strip()] for item in reports if item.strip()]


GENERATED_ROW = ("prompt", "response", "truncated")  # the keys of each row `comoe generate` writes


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
    compile: bool = setting(
        False, "torch.compile each decoder block before generating (the first batches compile)"
    )
    load_in_4bit: bool | None = setting(None, LOAD_IN_4BIT_HELP + RECORDED_QUANTIZATION_HELP)
    load_in_8bit: bool | None = setting(None, LOAD_IN_8BIT_HELP + RECORDED_QUANTIZATION_HELP)
    prompt: str | None = setting(None, "one prompt (the user's turn under the chat template)")
    prompts: str | None = setting(
        None,
        "a file of prompts: .txt (one per line) or .jsonl (rows with prompt or messages, and optionally "
        "task: an adapter routed by task routes each row by its own task)",
    )
    template: str = setting(
        "auto",
        "prompt template (auto: the one the adapter was trained with, else none)",
        choices=TEMPLATE_CHOICES,
    )
    task: str | None = setting(
        None,
        "route every prompt by this task, one of the tasks the adapter records (adapters routed by task: "
        "--preset moelora-liu; refused for others); it overrides the task of each --prompts row; default: "
        "each row's task, else the mean of the adapter's tasks' gates, with a warning",
    )
    max_new_tokens: int = setting(128, "tokens to generate per prompt")
    batch_size: int = setting(8, "prompts per generate call")
    output: str | None = setting(
        None,
        f"write JSONL rows {{{', '.join(GENERATED_ROW)}}} here (default: print them); truncated: the prompt "
        "was cut to fit the model's context",
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        check_placement(self)
        check_choice("template", self.template, TEMPLATE_CHOICES)
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        check_int("batch_size", self.batch_size, low=1)
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of --prompt TEXT or --prompts FILE")
