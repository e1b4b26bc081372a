"""The package's import structure: every module imports on its own, no cycles, modules import only from
their own layer or below (docs/design.md), `import comoe` loads no peft, and the command line's --help
loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Layers from the bottom up (docs/design.md); a module may import from its own layer or a lower one.
LAYERS = [
    ["comoe.validation", "comoe.errors", "comoe.files", "comoe.config", "comoe.settings", "comoe.plugins"],
    ["comoe.moe"],
    ["comoe.objectives"],
    ["comoe.adapter", "comoe.losses"],
    ["comoe.models", "comoe.data"],
    ["comoe.analysis.metrics"],
    ["comoe.training", "comoe.evaluation", "comoe.integrations", "comoe.serving"],
    ["comoe.analysis"],
    ["comoe.recipes"],
    ["comoe.cli", "comoe"],
]
# Settings modules are read by the command line before it knows what a subcommand needs: pure Python.
SETTINGS_MODULES = [
    "comoe.settings",
    "comoe.training.settings",
    "comoe.evaluation.settings",
    "comoe.analysis.settings",
    "comoe.recipes.settings",
    "comoe.serving.settings",
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in (SRC / "comoe").rglob("*.py"))


def comoe_imports(name: str) -> set[str]:
    """comoe modules imported anywhere in a module except under `if TYPE_CHECKING:`."""
    path = SRC / (
        name.replace(".", "/") + ("/__init__.py" if (SRC / name.replace(".", "/")).is_dir() else ".py")
    )
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for child in block.body
        for node in ast.walk(child)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comoe"):
            for alias in node.names:  # `from comoe.x import y` may import the module comoe.x.y
                found.add(
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                )
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("comoe")}
    return found - {name}


def layer_of(name: str) -> int:
    """The layer of the longest prefix listed in LAYERS."""
    best, level = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{name} is in no layer of tests/test_imports.py:LAYERS"
    return level


def test_every_module_belongs_to_a_layer_and_imports_only_downwards():
    wrong = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name in MODULES
        for target in comoe_imports(name)
        if layer_of(target) > layer_of(name)
    ]
    assert not wrong, "\n".join(wrong)


def test_import_graph_has_no_cycles():
    graph = {name: comoe_imports(name) & set(MODULES) for name in MODULES}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The checker itself: a planted back edge must be reported."""
    real = comoe_imports
    monkeypatch.setitem(
        globals(), "comoe_imports", lambda n: real(n) | ({"comoe.cli"} if n == "comoe.config" else set())
    )
    with pytest.raises(pytest.fail.Exception, match="import cycle: .*comoe.config"):
        test_import_graph_has_no_cycles()


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SRC.parent)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_module_imports_on_its_own():
    """Each module imported first, with every other comoe module forgotten: an import that only works
    after another module was loaded (a hidden cycle or a missing import) fails here."""
    code = f"""
import importlib, sys
for name in {MODULES!r}:
    for loaded in [m for m in sys.modules if m == "comoe" or m.startswith("comoe.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("ok")
"""
    assert run_python(code).strip() == "ok"


def test_import_comoe_and_its_main_names_load_no_peft():
    out = run_python(
        "import sys, comoe; a = 'peft' in sys.modules; from comoe import ComoeConfig, ComoeModel, get_comoe_model;"
        "print(a, 'peft' in sys.modules, 'torch' in sys.modules)"
    )
    assert out.split() == ["False", "False", "True"]  # the model needs torch, not peft


def test_cli_help_and_settings_load_no_torch():
    code = f"""
import contextlib, io, sys
import comoe.cli, {", ".join(SETTINGS_MODULES)}
for argv in (["--help"], *([name, "--help"] for name in ("train", "eval", "compare", "generate", "analyze", "demo"))):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            comoe.cli.main(argv)
        except SystemExit as stop:
            assert stop.code == 0, argv
    assert "usage: comoe" in out.getvalue(), argv
print(sorted(m for m in ("torch", "transformers", "peft", "numpy") if m in sys.modules))
"""
    assert run_python(code).strip() == "[]"


def mirrored_test(name: str) -> Path:
    """tests/<package path>/test_<module>.py for comoe.<package path>.<module>."""
    parts = name.split(".")[1:]
    return SRC.parent / "tests" / Path(*parts[:-1]) / f"test_{parts[-1]}.py"


def test_every_module_has_its_mirrored_test_file():
    packages = {name for name in MODULES if (SRC / name.replace(".", "/")).is_dir()}
    missing = [
        f"{name} -> {mirrored_test(name).relative_to(SRC.parent)}"
        for name in MODULES
        if name not in packages and not mirrored_test(name).is_file()
    ]
    assert not missing, "modules without their test file:\n" + "\n".join(missing)


def test_registry_check_of_a_training_config_loads_no_transformers():
    """`comoe train` checks a config's registry names (banks, routing kinds, objectives, the banks FFN-block
    experts take) before the base model loads: that check imports the registries, not transformers (about
    two seconds more), so a misspelled name is reported at once."""
    out = run_python(
        "import sys, comoe.training.registered; print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    assert out.split() == ["False", "True"]
