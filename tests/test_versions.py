"""Results follow the code (issue 9): the suite's, task's and router's versions are part of the
resolved spec and so of the run id; bumping one router's version changes only its runs' ids."""

from __future__ import annotations

from pathlib import Path

import pytest

import moebench
from moebench.core.registry import ROUTERS, TASKS
from moebench.grids.expand import expand
from moebench.training.spec import SpecError, resolve_spec, run_id

TOY = Path(moebench.__file__).parent / "grids" / "configs" / "toy.yaml"


_SPECS: list[dict] = []


def _ids():
    """Run ids of the toy grid under the current versions (expanded once; the ids recomputed)."""
    if not _SPECS:
        _SPECS.extend(expand(TOY))
    return {(s["label"], s["seed"]): run_id({k: v for k, v in s.items() if k != "versions"}) for s in _SPECS}


def test_resolved_spec_records_the_versions():
    s = resolve_spec({"task": "toy", "moe": {"router": "hash"}})
    assert s["versions"] == {"suite": moebench.__version__, "task": 1, "router": 1}
    assert resolve_spec({"task": "toy"})["versions"]["router"] is None  # dense: no router


def test_bumping_one_router_version_changes_only_its_run_ids(monkeypatch):
    before = _ids()
    monkeypatch.setattr(ROUTERS.get("hash"), "version", 2)
    after = _ids()
    changed = {key[0] for key in before if before[key] != after[key]}
    assert changed == {"hash-position"}  # the toy grid labels hash by its key


def test_bumping_the_task_version_changes_every_run_of_the_task(monkeypatch):
    before = _ids()
    monkeypatch.setattr(TASKS.get("toy"), "version", 2)
    after = _ids()
    assert all(before[k] != after[k] for k in before)


def test_bumping_the_suite_version_changes_every_run(monkeypatch):
    before = _ids()
    monkeypatch.setattr("moebench.version.__version__", "99.0.0")
    assert all(before[k] != v for k, v in _ids().items())


def test_a_record_keeps_the_versions_it_ran_with(monkeypatch):
    s = resolve_spec({"task": "toy", "moe": {"router": "hash"}})
    rid = run_id(s)
    monkeypatch.setattr(ROUTERS.get("hash"), "version", 2)
    assert run_id(s) == rid  # a spec.yaml read back names the run it was
    assert run_id({k: v for k, v in s.items() if k != "versions"}) != rid  # a fresh spec is a new run


def test_bad_versions_field_names_it():
    with pytest.raises(SpecError, match="versions"):
        resolve_spec({"task": "toy", "versions": {"suite": "1"}})


def test_the_commit_is_dirty_for_code_changes_not_for_results(tmp_path):
    """A committed sample regenerated in place changes only results/: its records must not call the code
    they ran "dirty"; an edited source file must."""
    import subprocess

    from moebench.training.records import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results" / "r.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "results" / "r.json").unlink()
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
