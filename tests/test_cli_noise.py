"""Third-party noise: `comoe eval` and `comoe generate` print on stderr only comoe's own lines and progress
bars. Importing transformers imports torchao and importing peft imports bitsandbytes, which log about
kernels this machine lacks (and make torch log a deprecation); the CLI drops exactly those records
(comoe.cli.THIRD_PARTY_NOISE) and nothing else."""

import logging
import re
import subprocess
import sys
import warnings

import pytest

from comoe import cli
from comoe.training.loop import train
from tests.helpers import train_args

# A tqdm bar as transformers and comoe draw them: "Loading weights:  50%|#####     | 1/2 [...]".
PROGRESS_BAR = re.compile(r"^[\w ]+:\s+\d+%\|")

# One record of each filtered kind, as the libraries log them here (torchao 0.18, bitsandbytes 0.50, torch 2.13).
NOISE = {
    "torchao": "Failed to load /v/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not "
    "load this library: /v/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
    "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses is deprecated "
    "and will be an error in a future release.",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module "
    "named 'kernels'. Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast from torch.float32 to float16 "
    "during quantization",
}


def stderr_lines(text: str) -> list[str]:
    """stderr split at newlines and at the carriage returns that redraw progress bars."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


@pytest.mark.slow  # two subprocess launches
def test_eval_and_generate_print_no_third_party_noise_on_stderr(tiny_model_dir, tmp_path):
    adapter = train(train_args(tiny_model_dir, tmp_path / "run", max_steps=1, save_steps=0)) / "adapter"
    commands = {
        "eval": ["--tasks", "chain_sum", "--limit", "2", "--mode", "generate", "--max-new-tokens", "4"],
        "generate": ["--prompt", "What is 2 + 3?", "--max-new-tokens", "4"],
    }
    for command, extra in commands.items():
        result = subprocess.run(
            [sys.executable, "-m", "comoe.cli", command, "--adapter", str(adapter), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        foreign = [line for line in stderr_lines(result.stderr) if not PROGRESS_BAR.match(line)]
        assert not foreign, f"comoe {command} printed on stderr:\n" + "\n".join(foreign)
        assert any(line.startswith("Loading weights:") for line in stderr_lines(result.stderr))
    assert '"response": ' in result.stdout  # generate's JSONL rows, alone on stdout


def test_exactly_the_listed_records_are_dropped_while_a_command_runs(caplog):
    kept = {name: "Failed to load the model weights: disk full" for name in NOISE}
    kept["torchao"] = "Failed to load /v/site-packages/torchao/weights.bin: no such file"
    with cli._without_third_party_noise():
        for name, message in NOISE.items():
            logging.getLogger(name).warning(message)
        for name, message in kept.items():
            logging.getLogger(name).warning(message)
    assert [(r.name, r.getMessage()) for r in caplog.records] == list(kept.items())
    caplog.clear()
    for name, message in NOISE.items():  # after the command: the libraries' own logging as it was
        logging.getLogger(name).warning(message)
    assert [(r.name, r.getMessage()) for r in caplog.records] == list(NOISE.items())
    assert not any(logging.getLogger(name).filters for name in NOISE)


def test_the_listed_warnings_are_ignored_while_a_command_runs(recwarn):
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with cli._without_third_party_noise():
        warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    warnings.warn(message, FutureWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["another deprecation", message]
