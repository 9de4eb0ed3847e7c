"""The package's structure rules, read from the source (no imports of dist8 needed):

* a lower layer never imports a higher one (quant -> kernels -> optim -> nn -> shard ->
  checkpoint -> integrations -> train);
* the module import graph of ``dist8`` is acyclic (imports inside functions count too);
* no module uses another module's ``_private`` names (``from m import _x``, ``m._x``);
* every file over 400 lines says at its top why it is one concern.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dist8"
LAYERS = ["quant", "kernels", "optim", "nn", "shard", "checkpoint", "integrations", "train"]
# The package face and the CLI sit on top: they may import anything.
TOP = {"dist8", "dist8.cli", "dist8.__main__", "dist8.version"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not MODULES[mod].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in ``mod``."""
    tree = ast.parse(MODULES[mod].read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run: not edges of the graph
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            names = [a.name for a in node.names]
            # "from dist8.optim import dtensor" imports a module, not a name
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            out.append((target, [n for n in names if n not in subs], node.lineno))
            out += [(f"{target}.{n}", [], node.lineno) for n in subs]
    return [(t, n, line) for t, n, line in out if t == "dist8" or t.startswith("dist8.")]


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def test_lower_layers_never_import_higher_ones():
    bad = []
    for mod in MODULES:
        if mod in TOP or _layer(mod) is None:
            continue
        for target, _names, line in _imports(mod):
            if target in ("dist8", "dist8.version"):
                if target == "dist8":
                    bad.append(f"{mod}:{line} imports the package face `dist8` (use dist8.version or the layer)")
                continue
            lt = _layer(target)
            if lt is not None and lt > _layer(mod):
                bad.append(f"{mod}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_import_graph_is_acyclic():
    graph = {m: sorted({t for t, _, _ in _imports(m) if t in MODULES and t != m}) for m in MODULES if m not in TOP}
    # a package's __init__ importing its own submodules is how packages work; leave those edges out
    for m in graph:
        graph[m] = [t for t in graph[m] if not t.startswith(m + ".") and t not in TOP]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_no_module_uses_another_modules_private_names():
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, names, line in _imports(mod):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{mod}:{line} imports {target}.{n}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    if f"{_resolve(mod, node)}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{_resolve(mod, node)}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("dist8"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "dist8"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_long_files_state_their_one_concern():
    bad = []
    for mod, path in MODULES.items():
        lines = path.read_text().splitlines()
        if len(lines) > 400:
            head = "\n".join(lines[:15]).lower()
            if "one concern" not in head:
                bad.append(f"{path.relative_to(PKG.parent)} has {len(lines)} lines and no 'one concern' reason at its top")
    assert not bad, "\n".join(bad)


def test_suite_order_names_existing_test_files():
    """tests/conftest.py orders the files for the xdist workers by FILE_SECONDS: a renamed or deleted
    file left in it would silently fall to the end of the queue."""
    from conftest import FILE_SECONDS

    here = Path(__file__).resolve().parent
    missing = [name for name in FILE_SECONDS if not (here / name).is_file()]
    assert not missing, f"tests/conftest.py FILE_SECONDS names files that do not exist: {missing}"
