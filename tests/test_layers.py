"""The package's layers: a module imports only from its own layer or below, type-only and function-level
imports included (README, Architecture)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import esacl_edge

PACKAGE = Path(esacl_edge.__file__).parent

# Lowest first. A module is named by its path in the package ("learn" is every module under learn/).
LAYERS = [
    ("leaves", {"__init__", "errors", "files", "names", "metrics", "checkpoint", "runlock", "chunk_log",
                "run_onnx"}),
    ("data", {"data"}),
    ("models", {"models", "weights"}),
    ("device", {"device"}),
    ("learn", {"learn"}),
    ("deploy", {"deploy"}),
    ("jobs", {"streaming", "run_folder", "stream_reader", "runner", "results", "bench", "evaluate", "pretrain",
              "reports", "plots", "arguments", "cli"}),
]


def layer_of(module: str) -> int:
    """The layer index of a dotted module name relative to the package ("learn.buffer", "cli")."""
    head = module.split(".")[0] or "__init__"
    for i, (_, members) in enumerate(LAYERS):
        if head in members:
            return i
    raise AssertionError(f"esacl_edge.{module} is in no layer: add it to LAYERS in {__file__}")


def imported_modules(path: Path, package: Path) -> set[str]:
    """Every esacl_edge module ``path`` imports, anywhere in the file, relative to the package."""
    rel = path.relative_to(package).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "esacl_edge":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # "from . import runner" imports the module runner
                sub = [*target, alias.name]
                is_module = (package.joinpath(*sub).with_suffix(".py").is_file()
                             or package.joinpath(*sub).is_dir())
                found.add(".".join(sub if is_module else target))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] if "." in a.name else "" for a in node.names
                      if a.name.split(".")[0] == "esacl_edge"}
    return found


def upward_imports(package: Path) -> list[str]:
    """Each import of a higher layer, as 'module (layer) imports module (layer)'."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        module = ".".join(rel.parts)
        here = layer_of(module)
        for target in sorted(imported_modules(path, package)):
            there = layer_of(target)
            if there > here:
                bad.append(f"{module} ({LAYERS[here][0]}) imports {target or 'esacl_edge'} ({LAYERS[there][0]})")
    return bad


def test_no_module_imports_a_higher_layer():
    assert upward_imports(PACKAGE) == []


def test_an_upward_import_is_caught(tmp_path):
    copy = tmp_path / "esacl_edge"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert upward_imports(copy) == []
    budget = copy / "device" / "budget.py"
    budget.write_text(budget.read_text() + "\nif False:\n    from ..learn.methods import Method\n")
    profiles = copy / "device" / "profiles.py"
    profiles.write_text(profiles.read_text() + "\n\ndef f():\n    from esacl_edge.deploy import export\n")
    assert upward_imports(copy) == ["device.budget (device) imports learn.methods (learn)",
                                    "device.profiles (device) imports deploy.export (deploy)"]


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
