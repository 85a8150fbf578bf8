"""The package layout is the architecture (docs/architecture.md): each package imports only
from the packages below it, Ray's private modules are reached from ``training.ray_internals``
alone, and no two modules import each other at load time."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parents[2] / "training"

# Lowest first: a package may import itself and any package before it, never one after it.
LAYERS = ("core", "tasks", "ray_internals", "observability", "worker", "driver")
RAY_PRIVATE = ("ray._", "ray.core.generated", "ray.train.v2._internal")


def module_name(path: Path) -> str:
    parts = path.relative_to(TRAINING.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "training" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def imports_of(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in ``path``: ``from training import x`` names
    ``training.x``; relative imports are resolved."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    package = (
        module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    )
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            if base in {"training", *(f"training.{layer}" for layer in LAYERS)}:
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def sources() -> list[Path]:
    return sorted(TRAINING.rglob("*.py"))


def layering_violations() -> list[str]:
    wrong = []
    for path in sources():
        own = layer_of(module_name(path))
        if own is None:  # training/__init__.py, __main__.py: the entry points
            continue
        allowed = set(LAYERS[: LAYERS.index(own) + 1])
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is not None and theirs not in allowed:
                wrong.append(f"{path.relative_to(TRAINING.parent)}:{line} ({own}) imports {target}")
    return wrong


def test_every_module_lives_in_a_layer():
    loose = [p.name for p in TRAINING.glob("*.py") if p.name not in {"__init__.py", "__main__.py"}]
    assert loose == [], f"modules outside the packages: {loose}"
    packages = {p.name for p in TRAINING.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), f"packages {packages} are not the layers {LAYERS}"


def test_packages_import_only_downwards():
    assert layering_violations() == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a core module that imports the worker is named."""
    fake = tmp_path / "training"
    for layer in LAYERS:
        (fake / layer).mkdir(parents=True)
        (fake / layer / "__init__.py").write_text("")
    (fake / "core" / "bad.py").write_text("from training.worker import attempt\n")
    monkeypatch.setattr(sys.modules[__name__], "TRAINING", fake)
    assert layering_violations() == [
        "training/core/bad.py:1 (core) imports training.worker",
        "training/core/bad.py:1 (core) imports training.worker.attempt",
    ]
    (fake / "core" / "bad.py").write_text("from training.core import worse\n")
    (fake / "core" / "worse.py").write_text("from training.core.bad import x\n")
    assert import_cycle() == ["training.core.bad", "training.core.worse", "training.core.bad"]


def test_ray_private_modules_only_from_ray_internals():
    wrong = []
    for path in sources():
        if layer_of(module_name(path)) == "ray_internals":
            continue
        text = path.read_text()
        for line, target in imports_of(path):
            if target.startswith(RAY_PRIVATE):
                wrong.append(f"{path.relative_to(TRAINING.parent)}:{line} imports {target}")
        wrong += [
            f"{path.relative_to(TRAINING.parent)} names {name}"
            for name in RAY_PRIVATE
            if f'"{name}' in text or f"'{name}" in text
        ]
    assert wrong == []


def import_cycle() -> list[str]:
    """The first cycle among load-time (top-level) imports, or []."""
    graph = {
        module_name(p): {
            t for _, t in imports_of(p, top_level_only=True) if t.startswith("training")
        }
        for p in sources()
    }
    known = set(graph)
    graph = {m: {t for t in targets if t in known and t != m} for m, targets in graph.items()}
    state: dict[str, str] = {}
    cycle: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open" and not cycle:
                cycle.extend([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycle


def test_no_import_cycles_at_load_time():
    assert import_cycle() == []


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_says_what_it_holds(layer):
    doc = ast.get_docstring(ast.parse((TRAINING / layer / "__init__.py").read_text()))
    assert doc, f"training/{layer}/__init__.py needs a docstring saying what the package holds"
