"""The layout of ``workflows/``: each layer imports only the layers below it, so the data path reads forward.

    common, artifacts  <-  data  <-  train  <-  tracking  <-  eval  <-  ops

(``clip_core`` is below all of them.) Training never imports a tracking server or a job, and no stage
imports the CLI. Checked on the source, for top-level and function-level imports alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
LAYERS = ["common", "artifacts", "data", "train", "tracking", "eval", "ops"]


def layer_of(module: str) -> str | None:
    """``workflows.train.loop`` -> ``train``; ``workflows`` itself and non-workflows modules -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "workflows" and len(parts) > 1 and parts[1] != "__init__" else None


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def violations(root: Path = WORKFLOWS) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        own = layer_of(".".join(rel.parts))
        if own is None:  # workflows/__init__.py: its lazy DataOrder export is checked below
            continue
        for module in sorted(imported_modules(path)):
            other = layer_of(module)
            if other in LAYERS and LAYERS.index(other) > LAYERS.index(own):
                found.append(f"{rel}: {own} imports {module} ({other} is above it)")
    return found


def test_every_import_points_down_the_layers() -> None:
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    (tmp_path / "workflows" / "train").mkdir(parents=True)
    (tmp_path / "workflows" / "train" / "loop.py").write_text(
        "def f():\n    from workflows.tracking.client import Tracker\n")
    assert violations(tmp_path / "workflows") == [
        "workflows/train/loop: train imports workflows.tracking.client (tracking is above it)",
        "workflows/train/loop: train imports workflows.tracking.client.Tracker (tracking is above it)"]


def test_every_module_sits_in_a_layer() -> None:
    stray = [p.name for p in WORKFLOWS.glob("*.py") if p.stem not in {"__init__", *LAYERS}]
    assert stray == [], "put new modules in a layer's package"
    assert sorted(p.name for p in WORKFLOWS.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        set(LAYERS) - {"artifacts"})


@pytest.mark.parametrize("name", ["DataOrder"])
def test_the_package_exports_the_training_order(name: str) -> None:
    import workflows
    from workflows.train import feed

    assert getattr(workflows, name) is getattr(feed, name)
