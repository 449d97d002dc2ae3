"""The package's shape, checked from source (ast): no import cycles between modules or
between subpackages, ``kernels`` and ``reference`` are leaves (torch, triton and themselves),
``kernels`` keeps no mutable module state, and every module stays readable in one sitting."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package name it installs as (kernels/ and reference/ map into cbkernels).
SOURCES = {"cbkernels": ROOT / "cbkernels", "cbkernels.kernels": ROOT / "kernels",
           "cbkernels.reference": ROOT / "reference"}
LEAVES = ("cbkernels.kernels", "cbkernels.reference")
# Past this many lines a module is probably two (a few kernel modules run a little long:
# jit code, launcher and compile configs belong together).
MAX_MODULE_LINES = 400
MUTATING_METHODS = {"append", "extend", "update", "setdefault", "pop", "popitem", "clear", "insert",
                    "remove", "add", "discard"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Every cbkernels module ``name`` imports, at any depth of its code."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import cbkernels.x.y` names a module or its parent
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def subpackage(name: str) -> str:
    """cbkernels.engine.cache -> engine; a top-level module is its own node (cbkernels.testing -> testing)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "cbkernels"


def subpackage_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        src = subpackage(name)
        graph.setdefault(src, set()).update(subpackage(d) for d in deps if subpackage(d) != src)
    return graph


def test_the_walk_sees_the_whole_package():
    assert {"cbkernels.engine.engine", "cbkernels.attention.integration", "cbkernels.kernels.paged_attention",
            "cbkernels.reference.kv_cache", "cbkernels.ops"} <= set(MODULES)
    assert "cbkernels.engine.model_runner" in GRAPH["cbkernels.engine.engine"]
    assert "cbkernels.attention.integration" in GRAPH["cbkernels.engine.engine"]  # a relative `..` import


def test_no_import_cycle_between_modules():
    assert _cycles(GRAPH) == []


def test_no_import_cycle_between_subpackages():
    graph = subpackage_graph()
    assert _cycles(graph) == [], "\n".join(f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]))


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_packages_import_nothing_from_the_layer(leaf):
    for name, deps in GRAPH.items():
        if name == leaf or name.startswith(leaf + "."):
            outside = {d for d in deps if not (d == leaf or d.startswith(leaf + "."))}
            assert not outside, f"{name} imports {sorted(outside)}"


def _module_state_mutations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    module_names = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)}
    found = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                found.append(f"{fn.name}: global {', '.join(node.names)}")
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AugAssign) else [])
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in module_names:
                    found.append(f"{fn.name}: {t.value.id}[...] =")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in module_names
                    and node.func.attr in MUTATING_METHODS):
                found.append(f"{fn.name}: {node.func.value.id}.{node.func.attr}()")
    return found


def test_kernels_hold_no_mutable_module_state():
    for name, path in MODULES.items():
        if name.startswith("cbkernels.kernels"):
            assert _module_state_mutations(path) == [], name


def test_the_state_check_catches_a_module_cache(tmp_path):
    source = tmp_path / "k.py"
    source.write_text("_CACHE = {}\n\ndef get(d):\n    _CACHE[d] = 1\n    _CACHE.setdefault(d, 2)\n")
    assert len(_module_state_mutations(source)) == 2


def test_modules_stay_small():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
