"""The package layout is the architecture: lower layers never import higher ones, and the built-in
routers and tasks install inside the moebench namespace, not as top-level packages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> rank; a module may import only packages of lower or equal rank (cli may import anything).
RANKS = {"core": 0, "training": 1, "grids": 2, "report": 2, "bench": 2, "cli": 3}
SIBLINGS_FORBIDDEN = {
    ("grids", "report"),
    ("report", "grids"),
    ("bench", "grids"),
    ("bench", "report"),
    ("grids", "bench"),
    ("report", "bench"),
    ("bench", "training"),
}  # bench times layers and models: core is all it needs


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "moebench" and parts[1] in RANKS else None


def test_lower_layers_never_import_higher_ones():
    bad = []
    for pkg, rank in RANKS.items():
        for path in sorted((ROOT / "moebench" / pkg).rglob("*.py")):
            for mod in _imports(path):
                other = _layer_of(mod)
                if other and (RANKS[other] > rank or (pkg, other) in SIBLINGS_FORBIDDEN):
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_plugins_import_only_the_core_and_training_layers():
    bad = [
        f"{p.relative_to(ROOT)} imports {m}"
        for folder in ("routers", "tasks")
        for p in sorted((ROOT / folder).rglob("*.py"))
        for m in _imports(p)
        if (_layer_of(m) or "core") not in ("core", "training")
    ]
    assert not bad, "\n".join(bad)


def test_routers_and_tasks_install_inside_the_namespace(tmp_path):
    """From a folder outside the repository, only moebench.routers / moebench.tasks exist."""
    code = (
        "import importlib.util as u, moebench.routers, moebench.tasks;"
        "print(u.find_spec('routers') is None, u.find_spec('tasks') is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"},
    )
    if out.returncode != 0:
        pytest.fail(out.stderr)
    assert out.stdout.split() == ["True", "True"]


def test_the_version_is_written_once():
    from moebench import __version__
    from moebench.version import __version__ as source

    assert __version__ == source
    assert 'version = "' not in (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]


# -- the module graph: no circle, no private name used across modules ---------------------------------
FOLDERS = {"moebench": "moebench", "routers": "moebench.routers", "tasks": "moebench.tasks"}


def _modules() -> dict[str, Path]:
    """Every installed module's dotted name -> its file (routers/ and tasks/ install as moebench.*)."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _source_of(node: ast.ImportFrom, mod: str, path: Path) -> str:
    """The module a ``from ... import`` reads from, relative imports resolved against ``mod``'s package."""
    if not node.level:
        return node.module or ""
    parts = mod.split(".")
    base = parts[: len(parts) - node.level + (path.name == "__init__.py")]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _scan(mod: str, path: Path, mods: dict[str, Path]) -> tuple[set[str], list[str]]:
    """The modules ``mod`` imports (anywhere in the file) and its uses of other modules' private names:
    ``from m import _x``, or ``m._x`` on a name bound to a module."""
    edges, bound, private = set(), {}, []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in (a for a in node.names if a.name in mods):
                edges.add(alias.name)
                bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and (src := _source_of(node, mod, path)) in mods:
            for alias in node.names:
                full = f"{src}.{alias.name}"
                edges.add(full if full in mods else src)
                if full in mods:
                    bound[alias.asname or alias.name] = full
                elif _is_private(alias.name) and src != mod:
                    private.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {src}")
    private += [
        f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in bound
        and _is_private(node.attr)
    ]
    return edges - {mod}, private


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the modules it imports), and every use of another module's private name."""
    mods = _modules()
    graph, private = {}, []
    for mod, path in mods.items():
        graph[mod], found = _scan(mod, path, mods)
        private += found
    return graph, private


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    """Imports inside functions count too: a deferred import hides a circle, it does not remove it."""
    circles = _circles(_graph()[0])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_check_sees_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_used_from_another_module():
    """A name that another module needs is that module's public API: spell it without the underscore."""
    private = _graph()[1]
    assert not private, "private names used across modules:\n" + "\n".join(private)


# -- short functions -----------------------------------------------------------------------------------
MAX_FUNCTION_LINES = 60  # def line to last line, docstring included
# Functions still over the limit, each with who splits it. Remove an entry when its function is split;
# the test fails on an entry that is no longer needed, so the list only shrinks.
LONG_FUNCTIONS_ALLOWED: set[str] = set()  # none left (issue 22 split the last four)


def _function_lengths(node: ast.AST, prefix: str = ""):
    """(qualified name, lines) of every function under ``node``, methods and nested functions included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child.end_lineno - child.lineno + 1  # type: ignore[operator]
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _function_lengths(child, f"{prefix}{child.name}.")


def _long_functions(root: Path = ROOT, folders=tuple(FOLDERS), limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """'folder/file.py::Class.function' -> lines, for every function in ``folders`` over ``limit`` lines."""
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for name, lines in _function_lengths(ast.parse(path.read_text())):
                if lines > limit:
                    out[f"{path.relative_to(root).as_posix()}::{name}"] = lines
    return out


def test_no_function_is_longer_than_the_limit():
    """Long functions are split into named steps (small private functions, an options object passed
    whole): a reader sees the steps before the details."""
    found = _long_functions()
    too_long = {k: n for k, n in found.items() if k not in LONG_FUNCTIONS_ALLOWED}
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(
        f"{n:4d}  {k}" for k, n in sorted(too_long.items(), key=lambda kv: -kv[1])
    )
    stale = sorted(LONG_FUNCTIONS_ALLOWED - set(found))
    assert not stale, "no longer over the limit, remove from LONG_FUNCTIONS_ALLOWED:\n" + "\n".join(stale)


def test_the_length_check_sees_a_long_method(tmp_path):
    body = "\n".join(f"        x = {i}" for i in range(MAX_FUNCTION_LINES - 1))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"class A:\n    def f(self):\n{body}\n    def g(self):\n        pass\n")
    assert _long_functions(tmp_path, ["pkg"]) == {}
    (tmp_path / "pkg" / "m.py").write_text(f"class A:\n    def f(self):\n{body}\n        y = 1\n")
    assert _long_functions(tmp_path, ["pkg"]) == {"pkg/m.py::A.f": MAX_FUNCTION_LINES + 1}
