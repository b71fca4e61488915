"""`moebench routers` / `moebench tasks` list from source, so they start without torch (issue 13)."""

import json
import subprocess
import sys

import pytest

from moebench.core import registry as R

LIST_WITHOUT_TORCH = """
import contextlib, io, json, sys
from moebench.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main([{command!r}])
print(json.dumps({{"rc": rc, "out": out.getvalue(), "torch": "torch" in sys.modules}}))
"""


@pytest.mark.parametrize("command,registry", [("routers", R.ROUTERS), ("tasks", R.TASKS)])
def test_listing_names_every_registered_entry_without_importing_torch(command, registry):
    proc = subprocess.run(
        [sys.executable, "-c", LIST_WITHOUT_TORCH.format(command=command)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    assert res["torch"] is False, f"`moebench {command}` imported torch"
    listed = {
        line.split()[0]: line.split(None, 1)[1].strip()
        for line in res["out"].splitlines()[1 if command == "routers" else 0 :]
    }
    for name, desc in registry.describe():  # the imported registry (this process imports the modules)
        if name in registry.builtin_names():
            assert listed.get(name) == desc, f"{name}: listed {listed.get(name)!r}, registered {desc!r}"


@pytest.mark.parametrize("kind,package", [("router", "moebench.routers"), ("task", "moebench.tasks")])
def test_static_listing_equals_the_imported_registry(monkeypatch, kind, package):
    monkeypatch.setattr(R, "entry_points", lambda group: [])
    static = R.Registry(kind, package, package).listing()
    real = R.ROUTERS if kind == "router" else R.TASKS
    builtin = set(real.builtin_names())
    assert static == [(n, d) for n, d in real.describe() if n in builtin]


def test_a_decorator_with_computed_arguments_falls_back_to_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "fakerouters"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "computed.py").write_text(
        'import fakerouters_reg as R\nNAME = "comp" + "uted"\n'
        '@R.REG.register(NAME)\nclass C:\n    """Computed name."""\n'
    )
    (tmp_path / "fakerouters_reg.py").write_text(
        "from moebench.core.registry import Registry\nREG = Registry('router', 'fakerouters', 'none')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(R, "entry_points", lambda group: [])
    import fakerouters_reg

    rows = dict(fakerouters_reg.REG.listing())
    assert rows == {"computed": "Computed name."}  # imported, so registered for real
