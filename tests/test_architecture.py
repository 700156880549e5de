"""The layout's promises, checked on the source: layers read off the imports, one DeepSpeed module, docstrings.

Layers, bottom to top (a module may import its own layer and those below, never one above, and no two
modules import each other, directly or around a circle):
  0 shared formats   vlm.formats.*, vlm.config, vlm.config_help, vlm.tokenizer
  1 model, data      vlm.model.*, vlm.hf.* (remote-code templates), vlm.data.*, data_tools.* (the offline tools
                     lean only on layer 0)
  2 assembly         vlm.build
  3 train            vlm.train.*
  4 export/inference vlm.load, vlm.export, vlm.inference
  5 eval/chat/demo   vlm.eval, vlm.chat, vlm.serve, vlm.doctor, vlm.demo.*
  6 entry points     launch.*
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm", "data_tools", "launch")
LAYERS = [
    ("vlm.formats", 0), ("vlm.config", 0), ("vlm.config_help", 0), ("vlm.tokenizer", 0),
    ("vlm.model", 1), ("vlm.hf", 1), ("vlm.data", 1), ("data_tools", 1),
    ("vlm.build", 2),
    ("vlm.train", 3),
    ("vlm.load", 4), ("vlm.export", 4), ("vlm.inference", 4),
    ("vlm.eval", 5), ("vlm.chat", 5), ("vlm.doctor", 5), ("vlm.demo", 5), ("vlm.serve", 5),
    ("launch", 6),
]
SYNTHETIC_GENERATOR = ("data_tools.synth", "data_tools.synth_text", "data_tools.shapes")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports anywhere (top level or inside functions), resolved to module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _layer(module: str) -> int:
    matches = [(len(prefix), layer) for prefix, layer in LAYERS if module == prefix or module.startswith(prefix + ".")]
    if not matches and module in PACKAGES:
        return -1  # an empty package __init__: nothing to place
    assert matches, f"{module} has no layer: add it to LAYERS (and to the README's layout)"
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {name: _imports(path, known) - {name} for name, path in sources.items()}


def test_no_module_imports_a_higher_layer(graph):
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle(graph):
    seen, on_path, circles = set(), [], []

    def visit(node: str) -> None:
        if node in on_path:
            circles.append(" -> ".join(on_path[on_path.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        on_path.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        on_path.pop()

    for module in sorted(graph):
        visit(module)
    assert not circles, "\n".join(circles)


def test_model_and_data_do_not_import_each_other(graph):
    crossing = [f"{a} imports {b}" for a, deps in graph.items() for b in deps
                if (a.startswith("vlm.model") and b.startswith("vlm.data"))
                or (a.startswith("vlm.data") and b.startswith("vlm.model"))]
    assert not crossing, "\n".join(crossing)


def test_only_the_demo_and_the_offline_tools_use_the_synthetic_generator(graph):
    users = [a for a, deps in graph.items() if deps & set(SYNTHETIC_GENERATOR)
             and not a.startswith(("vlm.demo", "data_tools"))]
    assert not users, users


def test_deepspeed_is_imported_by_one_module():
    importers = set()
    for name, path in _sources().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
                importers.add(name)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "deepspeed":
                importers.add(name)
    assert importers == {"vlm.train.distributed"}


def test_every_public_class_and_function_has_a_docstring():
    def undocumented(node, where: str, prefix: str = "") -> list[str]:
        found = []
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and not child.name.startswith("_"):
                if ast.get_docstring(child) is None:
                    found.append(f"{where}:{child.lineno} {prefix}{child.name}")
                if isinstance(child, ast.ClassDef):
                    found += undocumented(child, where, f"{prefix}{child.name}.")
        return found

    missing = [line for path in _sources().values()
               for line in undocumented(ast.parse(path.read_text(encoding="utf-8")), str(path.relative_to(REPO)))]
    assert not missing, "\n".join(missing)


def test_files_stay_under_500_lines():
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in _sources().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500]
    assert not long, long
