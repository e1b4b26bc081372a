"""comoe.files: atomic writes (content, permissions, no temporary left, a failed write keeps the old file)
and JSON reads that name the file."""

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comoe import files
from comoe.files import atomic_save_safetensors, atomic_write_text, read_json


def test_atomic_write_text_writes_the_text_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "er" / "notes.md"  # missing folders are created
    atomic_write_text(path, "héllo\nwörld\n")
    assert path.read_bytes() == "héllo\nwörld\n".encode()
    atomic_write_text(path, "second")
    assert path.read_text(encoding="utf-8") == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["notes.md"]


def test_written_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_a_failing_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, '{"old": true}')

    def broken(tmp):
        with open(tmp, "w") as handle:
            handle.write('{"new": ')  # half written, then the process fails
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files._atomic_write(path, broken)
    assert path.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_save_safetensors_round_trips_tensors_and_metadata(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    tensors = {
        "a": base.t(),
        "b": torch.tensor([1, 2, 3], dtype=torch.int64),
        "c": torch.ones(2, requires_grad=True),
    }
    path = tmp_path / "w.safetensors"
    atomic_save_safetensors(path, tensors, metadata={"format": "pt", "note": "x"})
    loaded = load_file(path)
    assert set(loaded) == {"a", "b", "c"}
    assert (
        torch.equal(loaded["a"], base.t()) and loaded["a"].is_contiguous()
    )  # transposed input stored as seen
    assert torch.equal(loaded["b"], tensors["b"]) and loaded["b"].dtype == torch.int64
    assert torch.equal(loaded["c"], torch.ones(2))
    with safe_open(path, "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_read_json_parses_and_names_the_file_when_missing_or_broken(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"r": 4, "names": ["q_proj"]}))
    assert read_json(good, "unused") == {"r": 4, "names": ["q_proj"]}
    missing = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError) as info:
        read_json(missing, "no adapter config here")
    assert str(info.value) == f"{missing}: no adapter config here"
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=rf"^{broken}: not valid JSON \("):
        read_json(broken, "unused")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=rf"^{binary}: not valid JSON"):
        read_json(binary, "unused")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_json(tmp_path, "is a folder")  # a folder is not a file
