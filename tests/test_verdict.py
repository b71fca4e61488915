"""One verdict on a run folder: `moebench status`, the launcher and `moebench report` ask the same
function (`rundir.inspect`) and give the same state and the same words for every kind of damaged or
unfinished record (issue 23: a status.json saying "finished" was listed raw by the report)."""

from __future__ import annotations

import shutil

import pytest

from moebench.cli import main
from moebench.grids import launch
from moebench.grids.expand import expand
from moebench.grids.status import status_rows
from moebench.report.load import load_record_set
from moebench.training import records
from moebench.training.rundir import run_path
from moebench.training.spec import run_id


def _status(**fields):
    """Damage: status.json with ``fields`` changed (atomically, as a hand edit would leave it)."""
    return lambda d, o: records.atomic_write_json(d / "status.json", {**records.read_json(d / "status.json"), **fields})


DAMAGE = {  # kind -> (damage(run_dir, other_run_dir), the state all three must give)
    "status.json state 'finished'": (_status(state="finished"), "corrupt"),
    "status.json not JSON": (lambda d, o: (d / "status.json").write_text('{"state": "do'), "corrupt"),
    "status.json a list": (lambda d, o: records.atomic_write_json(d / "status.json", ["done"]), "corrupt"),
    "final.json half-written": (lambda d, o: (d / "final.json").write_text('{"run_id": "x", "head'), "corrupt"),
    "final.json empty mapping": (lambda d, o: records.atomic_write_json(d / "final.json", {}), "corrupt"),
    "final.json missing": (lambda d, o: (d / "final.json").unlink(), "corrupt"),
    "final.json of another run": (lambda d, o: shutil.copy(o / "final.json", d / "final.json"), "corrupt"),
    "final.json headline not a number": (
        lambda d, o: records.atomic_write_json(
            d / "final.json", {**records.read_json(d / "final.json"), "headline": {"name": "top1", "value": "high"}}
        ),
        "corrupt",
    ),
    "metrics.jsonl torn tail": (
        lambda d, o: (d / "metrics.jsonl").write_bytes((d / "metrics.jsonl").read_bytes()[:-9]),
        "corrupt",
    ),
    "spec.yaml of another run": (lambda d, o: shutil.copy(o / "spec.yaml", d / "spec.yaml"), "corrupt"),
    "spec.yaml not YAML": (lambda d, o: (d / "spec.yaml").write_text("seed: [unclosed\n"), "corrupt"),
    "no status.json, spec.yaml not YAML": (
        lambda d, o: ((d / "status.json").unlink(), (d / "spec.yaml").write_text("seed: [x\n")),
        "corrupt",
    ),
    "running, no live process": (_status(state="running"), "interrupted"),
    "failed, out of memory": (_status(state="failed", reason="MemoryError", retryable=True), "failed"),
    "queued, never started": (_status(state="queued"), "queued"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_status_launcher_and_report_agree_word_for_word(tmp_path, capsys, done_grid, kind):
    path, done = done_grid
    results = tmp_path / "results"
    shutil.copytree(done, results)
    dirs = {s["label"]: run_path(results, s["grid"], run_id(s)) for s in expand(path)}
    d, other = dirs["softmax-topk"], dirs["dense"]
    damage, state = DAMAGE[kind]
    damage(d, other)

    (status,) = [r for r in status_rows(results / "g") if r["run_id"] == d.name]
    main(["status", str(results)])
    printed = capsys.readouterr().out
    (plan,) = [r for r in launch.plan(list(expand(path)), results) if r.run_id == d.name]
    lines: list[str] = []
    launch.run_grid(path, cluster="debug", results=results, dry_run=True, log=lines.append)
    report = load_record_set(results / "g").runs.set_index("run_id").loc[d.name]

    assert status["state"] == plan.state == report["state"] == state, (status, plan.state, report["state"])
    assert (status["reason"] or None) == report["reason"], (status["reason"], report["reason"])
    assert status["reason"] or state == "queued"  # every damaged or stopped run says why
    assert (report["state"] == "done") is False  # never counted
    if state in ("corrupt", "interrupted"):
        assert plan.why == status["reason"]
        assert f"  {d.name}: run: {status['reason']}" in lines  # what the launcher prints
    if state == "corrupt":
        assert status["reason"].startswith("corrupt record: ")
        assert status["reason"].endswith("; rerunning the grid sets it aside and reruns it")
        assert f"{d.name}: {status['reason']}" in printed
    if kind.startswith("status.json state"):
        assert "state 'finished' is not one of" in status["reason"]
