"""The product's imports point one way: no cycle among the modules of our four packages, and the storage layers
import only downwards (base imports nothing of ours; backends only base and the retry/resume stream).

Imports are read from the source with ``ast`` (function-level imports count too: a lazy import is still a
dependency), so the test needs no optional package installed and imports nothing it checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "model", "training", "shards_tools")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given top-level packages."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path], packages: tuple[str, ...]) -> set[str]:
    """Modules of ours that ``name`` imports (``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] not in packages:
                continue
            while t and t not in modules:  # "import a.b.c" where c is an attribute: the nearest module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules, packages) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle_in_the_product():
    graph = import_graph()
    assert "pipeline.storage.base" in graph and "pipeline.stream" in graph  # the walk found the modules
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_storage_layers_point_down():
    graph = import_graph()
    storage = {m for m in graph if m.startswith("pipeline.storage")}
    assert graph["pipeline.storage.base"] == set(), "storage.base must import nothing of ours"
    assert graph["pipeline.storage.remote_stream"] <= {"pipeline.storage.base"}
    backends = [m for m in storage if m not in ("pipeline.storage", "pipeline.storage.base",
                                                 "pipeline.storage.remote_stream", "pipeline.storage.cache")]
    assert {"pipeline.storage.local", "pipeline.storage.s3", "pipeline.storage.http"} <= set(backends)
    for b in backends:
        assert graph[b] <= {"pipeline.storage.base", "pipeline.storage.remote_stream"}, (b, graph[b])
    assert graph["pipeline.storage.cache"] <= {"pipeline.storage.base", "pipeline.storage.remote_stream"}
    for m in storage:  # storage is the bottom layer of the loader: it knows nothing of shards or stages
        assert all(t.startswith("pipeline.storage") for t in graph[m]), (m, graph[m])


def test_stages_point_down():
    graph = import_graph()
    order = ["pipeline.items", "pipeline.read", "pipeline.mix", "pipeline.packer", "pipeline.stream",
             "pipeline.loader"]
    for i, m in enumerate(order):
        assert not graph[m] & set(order[i + 1:]), f"{m} imports a later stage: {graph[m] & set(order[i + 1:])}"


def test_no_test_helper_in_the_product():
    files = module_files(ROOT, PACKAGES)
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(m.split(".")[0] in ("tests", "moto", "pytest") for m in mods), (name, mods)
    assert not [n for n in files if "testing" in n], "test helpers belong under tests/"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_check_sees_the_old_storage_circle(tmp_path):
    """The layout before the storage package (storage.py <-> cache.py, the backends importing storage back)."""
    _write(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/storage.py": "def open_stream():\n    from pipeline.cache import ShardCache\n",
        "pipeline/cache.py": "from pipeline.remote_stream import wait_for\nfrom pipeline.storage import stats\n",
        "pipeline/remote_stream.py": "from pipeline.storage import StorageError\n",
    })
    graph = import_graph(tmp_path, ("pipeline",))
    assert graph["pipeline.cache"] == {"pipeline.remote_stream", "pipeline.storage"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "pipeline.storage" in cycle


@pytest.mark.parametrize("text", ["from .. import a", "from ..a import x", "import pkg.a", "from pkg import a",
                                  "from pkg.a import x"])
def test_the_check_resolves_every_import_form(tmp_path, text):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg.sub.b import y\n", "pkg/sub/__init__.py": "",
                      "pkg/sub/b.py": f"def y():\n    {text}\n"})
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.sub.b"] == {"pkg.a"}, graph
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]
