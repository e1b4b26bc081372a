"""The `comoe` command line: train, eval, compare, generate, analyze, demo, serve.

Each subcommand's flags come from its settings dataclass (comoe.*.settings, pure Python), so `comoe --help`
and `comoe train --help` never load torch, transformers or peft. The modules that do the work are imported
inside the handler of the subcommand that runs, for that reason only.

The library prints nothing itself; while a subcommand runs, the CLI shows the "comoe" logger's progress and
warnings on stdout, one plain line each (on stderr for `comoe generate`, whose stdout is its JSONL rows).

Third-party noise is dropped while a command runs, message by message (THIRD_PARTY_NOISE): importing
transformers imports torchao when it is installed (its quantizer registry does), and importing peft imports
bitsandbytes; on every start both log about optional kernels this machine lacks, and torchao's import makes
torch log a deprecation. Neither import can be left out: transformers imports torchao itself, and peft is
imported by the modules that load an adapter folder of either kind (choosing by the folder's kind would
take an import at run time, which comoe keeps to the handlers below). None of it concerns the command, so
the CLI filters exactly those records (and THIRD_PARTY_WARNINGS: peft on a quantized base warns of a
transformers deprecation); every other message of these libraries still shows.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from comoe.analysis.settings import AnalyzeArgs
from comoe.errors import USER_ERRORS
from comoe.evaluation.settings import CompareArgs, EvalArgs, GenerateArgs
from comoe.plugins import load_plugins
from comoe.recipes.settings import DemoArgs
from comoe.serving.settings import ServeArgs
from comoe.settings import add_flags, load_settings
from comoe.training.settings import TrainArgs


def _train(args: TrainArgs) -> None:
    from comoe.training.registered import check_registered_names

    check_registered_names(args)  # importing the registries only: about a second, before transformers
    from comoe.training.loop import train

    run = train(args)
    if os.environ.get("RANK", "0") == "0":
        print(f"adapter saved to {run / 'adapter'}")


def _eval(args: EvalArgs) -> None:
    from comoe.evaluation.compare import format_comparison
    from comoe.evaluation.runner import run_evals

    reports, comparison = run_evals(args)
    for report in reports:
        if len(reports) > 1:
            print(f"\n== {report['label']}" + (f" ({report['adapter']})" if report["adapter"] else ""))
        for name, row in report["tasks"].items():
            low, high = row["ci95"]
            interval = f"95% CI {100 * low:.1f}-{100 * high:.1f}"
            print(f"{name:22s} {100 * row['accuracy']:5.1f}%  (n={row['n']}, {interval})  {_baselines(row)}")
        print(f"{'average':22s} {100 * report['average']:5.1f}%   ({report['seconds']} s)")
    if comparison is not None:
        print("\n" + format_comparison(comparison))


def _short(answer: Any, width: int = 40) -> str:
    """An answer as printed on a table line: quoted, cut to `width` characters (the report has it whole),
    closed by the quote it opens with (repr's double quotes for an answer holding an apostrophe)."""
    text = repr(answer)
    return text if len(text) <= width else text[: width - 4] + "..." + text[0] * (text[0] in "'\"")


def _baselines(row: dict[str, Any]) -> str:
    """A task's baselines and predictions on its line of `comoe eval`'s table."""
    parts = [f"chance {100 * row['chance']:.1f}"] if row.get("chance") is not None else []
    majority, trained = row.get("majority"), row.get("train_majority")
    if majority:
        parts.append(f"majority {100 * majority['accuracy']:.1f} ({_short(majority['answer'])})")
    if trained:
        parts.append(f"training majority {100 * trained['accuracy']:.1f} ({_short(trained['answer'])})")
    counts = list((row.get("predicted") or {}).items())[:3]
    if counts:
        parts.append("predicted " + ", ".join(f"{_short(a)} {100 * c / row['n']:.0f}%" for a, c in counts))
    generation = row.get("generation")
    if generation:
        parts.append(
            f"empty {100 * generation['empty']:.0f}%, repeated {100 * generation['repeated']:.0f}%, "
            f"unparseable {100 * generation['unparseable']:.0f}%"
        )
    return "  ".join(parts)


def _compare(args: CompareArgs) -> None:
    from comoe.evaluation.compare import format_comparison, run_compare

    print(format_comparison(run_compare(args)))


def _generate(args: GenerateArgs) -> None:
    from comoe.evaluation.respond import run_generate

    rows = run_generate(args)
    if args.output:
        print(f"{len(rows)} responses written to {args.output}", file=sys.stderr)


def _analyze(args: AnalyzeArgs) -> None:
    from comoe.analysis.pipeline import analyze

    summary = analyze(args)
    print(
        f"I(task; expert) {summary['mean_mi_task_expert_bits']:.4f} bits "
        f"({100 * summary['mean_nmi_task_expert']:.2f}% of H(task)), expert similarity "
        f"{summary['mean_expert_similarity']:.4f}, load CV {summary['mean_load_cv']:.3f}"
    )


def _demo(args: DemoArgs) -> None:
    from comoe.recipes.demo import run_demo
    from comoe.recipes.report import REPORT_NAME, accuracy_table

    report = run_demo(args) / REPORT_NAME
    print(accuracy_table(report))
    print(f"report: {report}")


def _serve(args: ServeArgs) -> None:
    from comoe.serving.server import serve

    code = serve(args)
    if code:
        sys.exit(code)


INTERRUPTED = 130  # the shell's exit status for a process stopped by Ctrl-C (128 + SIGINT)
# Commands whose progress and warnings go to stderr: generate prints its JSONL rows on stdout.
PROGRESS_ON_STDERR = {"generate"}

# name: (settings class, handler, help)
COMMANDS: dict[str, tuple[type, Callable[[Any], None], str]] = {
    "train": (TrainArgs, _train, "fine-tune a base model with a comoe preset or PEFT LoRA / DoRA"),
    "eval": (EvalArgs, _eval, "evaluate a base model, with or without adapters, per task"),
    "compare": (CompareArgs, _compare, "paired comparison of eval reports of the same questions"),
    "generate": (GenerateArgs, _generate, "answer prompts with a base model and optional adapter (JSONL)"),
    "analyze": (AnalyzeArgs, _analyze, "measure expert specialisation of a comoe adapter"),
    "demo": (DemoArgs, _demo, "fine-tune SmolLM2-135M on built-in tasks, evaluate, write a report"),
    "serve": (ServeArgs, _serve, "serve a comoe adapter: an OpenAI-compatible vLLM server"),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad choice, an empty --columns) are one line and exit 2, as
    every other user error is, instead of the usage block; the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"comoe: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="comoe",
        description="Mixtures of LoRA experts with contrastive "
        "expert objectives (CoMoE, MoELoRA): train, evaluate, analyse.",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (settings, _, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--config", help="YAML file with the same keys as the flags (flags override it)")
        command.add_argument(
            "--plugin",
            action="append",
            metavar="MODULE",
            help="import this module first: your own objectives, expert banks, mix strategies or record "
            "formats register themselves there (repeatable; also COMOE_PLUGINS and the comoe.plugins "
            "entry points)",
        )
        add_flags(command, settings)
    return parser


# Log records of third-party libraries that say nothing about a command's work, by logger name: the
# patterns their messages match (see the module docstring). Each is dropped; nothing else is.
THIRD_PARTY_NOISE: dict[str, tuple[str, ...]] = {
    # torchao's CUDA-only kernels, on a CPU build of torch (or another CUDA): "Failed to load .../_C_mxfp8..."
    "torchao": (r"Failed to load \S*torchao/_C\w*\.\S*\.so: ",),
    # torchao registers Enum pytree constants, which torch 2.13 deprecates: "<enum '...'> is an Enum subclass"
    "torch.utils._pytree": (
        r"<enum '\w+'> is an Enum subclass and is now natively supported by torch\.compile",
    ),
    # bitsandbytes' optional CPU 4-bit kernel lives in the `kernels` package (not installed; a fallback runs)
    "bitsandbytes.backends.cpu.ops": (r"Failed to load CPU gemm_4bit_forward from kernels-community",),
    # LLM.int8 (--load-in-8bit) computes in float16, and says so at every call for other dtypes
    "bitsandbytes.autograd._functions": (r"MatMul8bitLt: inputs will be cast from \S+ to float16",),
}
# Python warnings of the same kind, by category and the start of their message: peft asks a quantized
# base's transformers model for a property that transformers 5 renamed.
THIRD_PARTY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


class _DropMatching(logging.Filter):
    """Drops the records whose message matches one of `patterns`."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


@contextlib.contextmanager
def _without_third_party_noise() -> Iterator[None]:
    """THIRD_PARTY_NOISE filtered from the loggers that emit it, and THIRD_PARTY_WARNINGS ignored, while a
    command runs."""
    filters = [
        (logging.getLogger(name), _DropMatching(patterns)) for name, patterns in THIRD_PARTY_NOISE.items()
    ]
    for logger, noise in filters:
        logger.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for category, message in THIRD_PARTY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, noise in filters:
            logger.removeFilter(noise)


@contextlib.contextmanager
def _showing_progress(stream: Any) -> Iterator[None]:
    """The "comoe" logger's records at INFO and above on `stream`, as plain lines (the message only); the
    logger is left as it was found afterwards, so that main() can be called more than once in a process."""
    logger = logging.getLogger("comoe")
    level = logger.level
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _compare_sides(argv: list[str]) -> list[str]:
    """`comoe compare A1 A2 -- B1 B2` as `comoe compare A1,A2 B1,B2`: the reports between separators are one
    side's (its training seeds). argparse would drop the first `--` only, so the CLI joins the sides first;
    flags may stand anywhere: every option of compare but --help takes a value (`--samples 200`, `--output
    c.json`, `--config`), which is never a report."""
    command = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if command is None or argv[command] != "compare" or "--" not in argv[command + 1 :]:
        return argv
    flags: list[str] = []
    sides: list[list[str]] = [[]]
    tokens = iter(argv[command + 1 :])
    for token in tokens:
        if token == "--":
            sides.append([])
        elif token.startswith("-"):
            valued = token not in ("-h", "--help") and "=" not in token
            value = next(tokens, None) if valued else None
            flags += [token] if value is None else [token, value]
        else:
            sides[-1].append(token)
    return [*argv[: command + 1], *flags, *(",".join(side) for side in sides if side)]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(_compare_sides(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as stop:  # --help (0), or flags argparse refused (2: said in one line)
        return stop.code if isinstance(stop.code, int) else 2
    settings, handler, _ = COMMANDS[args.command]
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "config", "plugin")}
    try:
        with (
            _without_third_party_noise(),
            _showing_progress(sys.stderr if args.command in PROGRESS_ON_STDERR else sys.stdout),
        ):
            load_plugins(args.plugin or [])
            handler(load_settings(settings, args.config, flags))
    except KeyboardInterrupt as error:  # Interrupted (training) says where it stopped and how to go on
        if args.debug:
            raise
        print(f"comoe: {str(error) or 'interrupted'}", file=sys.stderr)
        return INTERRUPTED
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())  # one line
        print(f"comoe: error: {message} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
