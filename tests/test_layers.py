"""The package's layers: every import of lmforge code, lazy ones inside functions included,
points at the same layer or one below (../shared/DESIGN.md, "Layers"; the closing note of the
layout issue draws the tree). Read from the source with `ast`, so the test sees what runs.

A layer lists module prefixes; the longest prefix that matches a module decides its layer.
Two kinds of small leaf modules sit low on purpose, because many layers read them and they
import nothing above errors: contracts and tables (the distributed-environment contract, the
corpus catalog, the task registry, image names).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

SRC = REPO / "src"

#: Bottom to top. A module may import its own layer and the ones before it.
LAYERS: list[tuple[str, ...]] = [
    ("lmforge", "lmforge.errors", "lmforge.interrupts", "lmforge.logs", "lmforge.images"),
    # contracts and tables: leaf modules every layer may read
    ("lmforge.training.distributed", "lmforge.data.catalog", "lmforge.tasks"),
    ("lmforge.io", "lmforge.tracking"),
    ("lmforge.config",),
    # the task interface, the one caller of fairseq, and the data stages
    ("lmforge.tasks.base", "lmforge.fairseq_api", "lmforge.data"),
    # training (the launchers among it: local processes, the emulated PyTorchJob's containers, the
    # PyTorchJob and its Kubernetes API handling), the model's life after training, and the tasks'
    # implementations
    ("lmforge.training", "lmforge.training.launchers.containers", "lmforge.training.launchers.k8s_api",
     "lmforge.models", "lmforge.tasks.language_modeling"),
    ("lmforge.steps",),
    ("lmforge.pipeline",),
    # entry points: the CLI and the compatibility modules of earlier releases
    ("lmforge.cli", "lmforge.worker", "lmforge.scoring"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`: type hints, never run."""
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(n) for child in node.body for n in ast.walk(child)}
    return hidden


def lmforge_imports(path: Path) -> set[str]:
    """Every lmforge module `path` imports when it runs, at module level or inside a function.
    `from package import name` counts as `package.name` where that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hidden, found = type_checking_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lmforge"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if is_module(child) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lmforge")}
    return found


MODULES = sorted(SRC.joinpath("lmforge").rglob("*.py"))


def test_every_module_has_a_layer():
    assert MODULES
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_runs_up_the_layers(path):
    module = module_name(path)
    upward = sorted(d for d in lmforge_imports(path) if layer_of(d) > layer_of(module))
    assert not upward, f"{module} (layer {layer_of(module)}) imports {upward}, from higher layers"


def test_the_checker_sees_lazy_imports(tmp_path):
    """A lazy import inside a function counts: the check would catch one that runs up."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmforge import steps\n"
                      "def f():\n    from lmforge.pipeline import compile\n    import lmforge.cli\n"
                      "    from lmforge.config import RunConfig\n")
    assert lmforge_imports(source) == {"lmforge.pipeline.compile", "lmforge.cli", "lmforge.config"}
    assert layer_of("lmforge.pipeline") > layer_of("lmforge.io.storage")
