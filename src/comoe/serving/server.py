"""`comoe serve`: the command line of an OpenAI-compatible vLLM server for a comoe adapter, run in the
serving environment (`make serve-setup`: vLLM and the comoe-vllm plugin, serving/).

comoe resolves what only comoe knows (the base the adapter records, a built-in alias's converted folder),
then runs `python -m comoe_vllm.serve --adapter DIR --model FOLDER [vLLM server flags]` there, which checks
the folder and starts `vllm.entrypoints.openai.api_server` with the comoe model class of the base's family.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from comoe.adapter.folder import AdapterFolder
from comoe.models.gguf import ALIASES, alias_cache, cache_root
from comoe.serving.settings import SERVE_PYTHON_ENV, ServeArgs

logger = logging.getLogger("comoe")

# The repository's serving environment, built by `make serve-setup`.
DEFAULT_VENV = Path(__file__).resolve().parents[3] / ".venv-serve"


def serving_python(explicit: str | None) -> str:
    """The serving environment's python: --python, else $COMOE_SERVE_PYTHON, else .venv-serve's;
    FileNotFoundError naming `make serve-setup` when there is none."""
    python = explicit or os.environ.get(SERVE_PYTHON_ENV) or str(DEFAULT_VENV / "bin" / "python")
    if not Path(python).is_file():
        raise FileNotFoundError(
            f"no serving environment at {python}: build it with `make serve-setup` (vLLM and comoe-vllm in "
            f".venv-serve), or pass --python / set {SERVE_PYTHON_ENV}"
        )
    return python


def base_model(args: ServeArgs, folder: AdapterFolder) -> str:
    """The base to serve: --model, else the adapter's recorded base; an alias is its converted folder."""
    name = args.model or folder.base_model_name_or_path
    if not name:
        raise ValueError(f"{folder.path}: the adapter records no base model: pass --model")
    if name in ALIASES:
        return str(alias_cache(name, cache_root(None)))
    return os.path.abspath(name) if Path(name).is_dir() else name


def serve_command(args: ServeArgs) -> list[str]:
    """The serving environment's command line for `args` (checks the adapter folder first)."""
    folder = AdapterFolder.read(args.adapter)
    if folder.kind != "comoe":
        raise ValueError(
            f"{folder.path} is a PEFT adapter: vLLM serves it itself (--enable-lora --lora-modules NAME=DIR)"
        )
    adapter = os.path.abspath(folder.path)
    return [
        serving_python(args.python),
        "-m",
        "comoe_vllm.serve",
        "--adapter",
        adapter,
        "--model",
        base_model(args, folder),
        "--served-model-name",
        args.served_model_name or Path(adapter).name,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--dtype",
        args.dtype,
        "--tensor-parallel-size",
        str(args.tensor_parallel_size),
        "--kv-cache-memory-bytes",
        str(int(args.kv_cache_gib * (1 << 30))),
        *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
        *(["--enforce-eager"] if args.enforce_eager else []),
        *shlex.split(args.vllm_args or ""),
    ]


def serve(args: ServeArgs) -> int:
    """Run the server until it stops (Ctrl-C); returns its exit status."""
    command = serve_command(args)
    logger.info("serving %s at http://%s:%d/v1 (%s)", args.adapter, args.host, args.port, shlex.join(command))
    sys.stdout.flush()
    return subprocess.call(command)
