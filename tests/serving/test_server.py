"""`comoe serve`: the serving environment's command line (fast), and, with the serving environment built
(`make serve-setup`), vLLM serving comoe adapters: greedy tokens equal to comoe's transformers `generate`
and log-probabilities within float32 tolerance, the OpenAI-compatible server, tensor parallel 2, and a
compiled graph never reused for a changed adapter (slow)."""

import json
import sys
from pathlib import Path

import pytest

from comoe.adapter.model import get_comoe_model
from comoe.config import ComoeConfig
from comoe.models.gguf import alias_cache, cache_root
from comoe.serving.server import DEFAULT_VENV, serve_command
from comoe.serving.settings import ServeArgs
from tests.helpers import tiny_llama


@pytest.fixture
def fake_python(tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    return str(python)


def _adapter(folder: Path, base: str | None) -> Path:
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("moe"))
    model.config._name_or_path = base
    model.save_pretrained(folder)
    return folder


def test_command_serves_the_recorded_base_through_the_plugin(tmp_path, fake_python):
    folder = _adapter(tmp_path / "adapter", "smollm2-135m")
    command = serve_command(ServeArgs(adapter=str(folder), python=fake_python, port=8123, vllm_args="--seed 3"))
    assert command[:3] == [fake_python, "-m", "comoe_vllm.serve"]
    flags = dict(zip(command[3::2], command[4::2], strict=False))
    assert flags["--adapter"] == str(folder.resolve())
    assert flags["--model"] == str(alias_cache("smollm2-135m", cache_root(None)))  # the alias's folder
    assert flags["--served-model-name"] == "adapter"
    assert (flags["--port"], flags["--host"], flags["--dtype"]) == ("8123", "127.0.0.1", "float32")
    assert command[-2:] == ["--seed", "3"]


def test_model_flag_overrides_the_recorded_base(tmp_path, fake_python):
    folder = _adapter(tmp_path / "adapter", None)
    command = serve_command(ServeArgs(adapter=str(folder), model=str(tmp_path), python=fake_python))
    assert command[command.index("--model") + 1] == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="records no base model"):
        serve_command(ServeArgs(adapter=str(folder), python=fake_python))


def test_missing_serving_environment_names_make_serve_setup(tmp_path):
    folder = _adapter(tmp_path / "adapter", "smollm2-135m")
    with pytest.raises(FileNotFoundError, match="make serve-setup"):
        serve_command(ServeArgs(adapter=str(folder), python=str(tmp_path / "none")))
