"""The layering of ARCHITECTURE.md, held against the code: every import (at the top of a
module or inside a function) points down the layers or stays in its own, and no modules
import each other in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "obliviate"

# Bottom to top: a module may import its own layer and the layers below it.
LAYERS = [
    {"errors", "settings", "io", "registry", "progress"},
    {"models"},
    {"data"},
    {"edits"},
    {"training"},
    {"evaluation"},
    {"methods"},
    {"attacks"},
    {"reports"},
    {"config"},
    {"pipeline"},
    {"api"},
    {"commands"},
    {"cli", "__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def layer_of(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{name} is in no layer: add its folder to LAYERS and to ARCHITECTURE.md")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, name, set(known)) for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in graph().items() for b in targets
                    if layer_of(b) > layer_of(a) and b != "obliviate")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_no_import_cycle():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in edges:
        if node not in index:
            connect(node)
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_the_check_sees_upward_and_hidden_imports(tmp_path):
    """The rule can fail: an import inside a function is seen, and one from the model layer
    up to the pipeline is flagged."""
    source = tmp_path / "loading.py"
    source.write_text("import torch\n\ndef f():\n    from obliviate.pipeline.erase import erase\n    return erase\n")
    found = imported(source, "obliviate.models.loading", set(modules()))
    assert found == {"obliviate.pipeline.erase"}
    assert layer_of("obliviate.pipeline.erase") > layer_of("obliviate.models.loading")
