"""An OpenAI-compatible vLLM server for a comoe adapter:

    python -m comoe_vllm.serve --adapter DIR [--model BASE_FOLDER] [any vLLM server flag ...]

is `python -m vllm.entrypoints.openai.api_server --model BASE --hf-overrides '{"architectures":
["ComoeLlamaForCausalLM"], "comoe_adapter": "DIR"}' ...` with the comoe class of the base's family chosen
and the folder checked before vLLM starts. The base defaults to the one the adapter records (a folder or a
hub id; comoe's aliases such as smollm2-135m are resolved by `comoe serve`, which calls this).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

from comoe_vllm.adapter import ComoeAdapter
from comoe_vllm.offline import engine_arguments

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def server_argv(adapter_dir: str, model: str | None, rest: list[str]) -> list[str]:
    """vLLM server flags serving `adapter_dir` on `model` (default: the base the adapter records)."""
    adapter_dir = os.path.abspath(adapter_dir)
    adapter = ComoeAdapter.read(adapter_dir)  # a folder vLLM cannot serve fails here, in one line
    model = model or adapter.base_model
    if not model:
        raise ValueError(f"{adapter_dir}: the adapter records no base model: pass --model FOLDER")
    arguments = engine_arguments(model, adapter_dir)
    return ["--model", model, "--hf-overrides", json.dumps(arguments["hf_overrides"]), *rest]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m comoe_vllm.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a comoe adapter folder")
    parser.add_argument("--model", help="the base model folder (default: the one the adapter records)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        flags = server_argv(args.adapter, args.model, rest)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"comoe-vllm: error: {error}\n")
    sys.argv = [SERVER_MODULE, *flags]
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
