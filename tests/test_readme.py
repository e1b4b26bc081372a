"""README.md's minimal Python example runs as written (on the real SmolLM2-135M)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_minimal_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = blocks[0]
    assert "get_comoe_model" in example and "save_pretrained" in example
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "'contrastive':" in printed
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert namespace["steps"], "record_routing() recorded no layer"
