"""The layout rules of ARCHITECTURE.md that a machine can check: no import cycle among the package's
modules, no source file over 600 lines, `_core` and the references independent of the families, and
the Python names of the C++ statistics columns equal to the C++ ones."""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "python", "fusedtrain")


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that `module` imports (anywhere in its body)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if alias.name == "_C":  # the compiled extension: a leaf, not the package's __init__
                    continue
                targets.add(full if full in modules else base)
    return {t for t in targets if t in modules and t != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    assert len(graph) > 30, sorted(graph)  # the walk found the package
    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_layers_import_downwards():
    """_core imports no family; a family imports no other family and nothing of the top level; a
    family's reference never reaches the compiled kernels."""
    graph = _graph()
    families = ("spherical", "mining", "sae", "optim")
    for module, targets in graph.items():
        parts = module.split(".")
        if parts[1:2] in (["_core"],) + tuple([f] for f in families):
            assert "fusedtrain" not in targets, module  # the top-level __init__
            assert all(t.split(".")[1] in ("_core", parts[1]) for t in targets), (module, targets)
        if len(parts) == 3 and parts[1] in families and "reference" in parts[2]:
            # The oracle never reaches a kernel: nothing it imports, directly or not, is the backend.
            seen, todo = set(), [module]
            while todo:
                for t in graph[todo.pop()] - seen:
                    seen.add(t)
                    todo.append(t)
            assert "fusedtrain._core.backend" not in seen, (module, sorted(seen))


@pytest.mark.parametrize("tree", ["python", "csrc", "tests", "benchmarks"])
def test_no_source_file_over_600_lines(tree):
    long = []
    for folder, _, files in os.walk(os.path.join(ROOT, tree)):
        for name in files:
            if name.endswith((".py", ".cpp", ".cu", ".h", ".cuh")):
                path = os.path.join(folder, name)
                with open(path) as f:
                    count = sum(1 for _ in f)
                if count > 600:
                    long.append(f"{os.path.relpath(path, ROOT)}: {count}")
    assert not long, long


def test_mining_statistics_columns_match_cpp():
    from fusedtrain.mining.stats import STAT_COUNT, MsStat, TcmStat

    header = open(os.path.join(ROOT, "csrc", "mining", "mining_math.h")).read()
    assert int(re.search(r"kStatCount\s*=\s*(\d+)", header).group(1)) == STAT_COUNT
    for enum, cpp_name, prefix in ((MsStat, "MsStat", "k"), (TcmStat, "TcmStat", "kTcm")):
        body = re.search(rf"enum {cpp_name} : int \{{([^}}]*)\}}", header).group(1)
        cpp = {}
        for item in body.split(","):
            name, value = (s.strip() for s in item.split("="))
            cpp[name[len(prefix):]] = int(value)
        ours = {"".join(w.capitalize() for w in member.name.split("_")): member.value for member in enum}
        assert ours == cpp, (ours, cpp)
