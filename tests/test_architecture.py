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
SIBLINGS_FORBIDDEN = {("grids", "report"), ("report", "grids"), ("bench", "grids"), ("bench", "report"),
                      ("grids", "bench"), ("report", "bench")}


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
    bad = [f"{p.relative_to(ROOT)} imports {m}" for folder in ("routers", "tasks")
           for p in sorted((ROOT / folder).rglob("*.py")) for m in _imports(p)
           if (_layer_of(m) or "core") not in ("core", "training")]
    assert not bad, "\n".join(bad)


def test_routers_and_tasks_install_inside_the_namespace(tmp_path):
    """From a folder outside the repository, only moebench.routers / moebench.tasks exist."""
    code = ("import importlib.util as u, moebench.routers, moebench.tasks;"
            "print(u.find_spec('routers') is None, u.find_spec('tasks') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"})
    if out.returncode != 0:
        pytest.fail(out.stderr)
    assert out.stdout.split() == ["True", "True"]


def test_the_version_is_written_once():
    from moebench import __version__
    from moebench.version import __version__ as source

    assert __version__ == source
    assert 'version = "' not in (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[0]
