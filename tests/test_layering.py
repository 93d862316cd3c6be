"""The layers' import rules: inpaint/ is the plain-PyTorch library (no Ray, nothing of the layers
above it), and the benchmark modules import one another without a cycle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ABOVE_THE_LIBRARY = ("cluster", "jobs", "benchmarks")


def test_the_model_library_never_imports_ray():
    modules = sorted(f"inpaint.{p.stem}" for p in (REPO / "inpaint").glob("*.py") if p.stem != "__init__")
    modules += ["inpaint.models", "inpaint.data"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            + "assert not leaked, leaked\nprint(len(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]


def module_name(path: Path, root: Path) -> str:
    """Dotted name of a .py file under ``root`` (the folder that holds the top-level package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path) -> set[str]:
    """Every module a file imports, anywhere in it (inside functions too), relative imports resolved;
    for ``from M import n`` both M and M.n (n may be a submodule)."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def import_graph(folder: Path, root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same folder it imports."""
    modules = {module_name(path, root): path for path in sorted(folder.rglob("*.py"))}
    return {name: imported_names(path, root) & set(modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_lazy_relative_and_from_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from pkg.b import helper\n")
    (package / "b.py").write_text("def helper():\n    from pkg import c\n")
    (package / "c.py").write_text("import os\nfrom . import a  # the planted cycle: a -> b -> c -> a\n")
    (package / "d.py").write_text("import pkg.a\n")
    graph = import_graph(package, tmp_path)
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(package, tmp_path)) is None


def test_the_benchmark_modules_import_one_another_without_a_cycle():
    graph = import_graph(REPO / "benchmarks", REPO)
    assert "benchmarks.system" in graph and graph["benchmarks.system"]  # the graph was read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_model_library_never_imports_cluster_jobs_or_benchmarks():
    offending = {}
    for path in sorted((REPO / "inpaint").rglob("*.py")):
        above = sorted(n for n in imported_names(path, REPO) if n.split(".")[0] in ABOVE_THE_LIBRARY)
        if above:
            offending[str(path.relative_to(REPO))] = above
    assert not offending, offending


# Direct filesystem access: everything goes through inpaint/storage.py (one retry policy, one error translator).
DIRECT_STORAGE = re.compile(r"\burl_to_fs\b|\bfsspec\.(open|filesystem|core|get_filesystem_class)\b|^\s*import fsspec\b|"
                            r"^\s*from fsspec\b|\.cat_file\(|\bfs\.(open|ls|rm|put|put_file|get|get_file|cat|pipe|exists)\(",
                            re.MULTILINE)
STORAGE_MODULE = Path("inpaint/storage.py")
# The client handed to Ray Train (which does its own I/O through it) is built by inpaint.storage;
# its wrapper's one check that a bucket exists talks to that client directly.
RAY_WRAPPER = Path("cluster/ray_storage.py")


def direct_storage_calls(text: str) -> list[str]:
    """The lines of ``text`` that reach a filesystem without inpaint.storage."""
    return [text[:m.start()].count("\n") + 1 for m in DIRECT_STORAGE.finditer(text)
            if not text[text.rfind("\n", 0, m.start()) + 1:m.start()].lstrip().startswith("#")]


def test_direct_storage_calls_are_found():
    planted = "import fsspec\nfs, path = fsspec.core.url_to_fs(url)\nwith fs.open(path) as f:\n    pass\n# fs.open( in a comment\n"
    assert direct_storage_calls(planted) == [1, 2, 2, 3]
    assert direct_storage_calls("from inpaint import storage\nstorage.read_bytes(url)\n") == []


def test_every_storage_access_in_the_library_and_the_cluster_layer_goes_through_one_module():
    offending = {}
    for folder in ("inpaint", "cluster"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.relative_to(REPO) not in (STORAGE_MODULE, RAY_WRAPPER):
                lines = direct_storage_calls(path.read_text())
                if lines:
                    offending[str(path.relative_to(REPO))] = lines
    assert not offending, f"use inpaint.storage instead (file: lines): {offending}"


# The one documented lazy re-export: ``inpaint.Inpainter`` (inpaint/__init__.py's __getattr__).
LAZY_REEXPORTS = {("inpaint", "inpaint.inference")}


def test_the_project_imports_without_a_cycle_and_no_layer_imports_one_above_it():
    graph: dict[str, set[str]] = {}
    modules = {module_name(p, REPO): p for f in ("inpaint", "cluster", "jobs") for p in sorted((REPO / f).rglob("*.py"))}
    for name, path in modules.items():
        graph[name] = {m for m in imported_names(path, REPO) & set(modules) - {name} if (name, m) not in LAZY_REEXPORTS}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    rank = {"inpaint": 0, "cluster": 1, "jobs": 2}
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if rank[b.split(".")[0]] > rank[a.split(".")[0]])
    assert not upward, upward
