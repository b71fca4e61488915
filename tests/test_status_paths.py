"""`moebench status` takes a grid's folder (results/quick, holding <run_id>/, the README's layout) as
well as a results root (results, holding <grid>/<run_id>/), and says what it looked for otherwise."""

from moebench.cli import main
from moebench.training import records
from moebench.training.rundir import run_path
from moebench.training.spec import resolve_spec, run_id


def _run(results, label):
    """A failed run's record, with a spec that really names its folder (the validator checks it)."""
    spec = resolve_spec({"grid": "quick", "task": "toy", "label": label, "moe": {"router": "hash"}})
    folder = run_path(results, "quick", run_id(spec))
    folder.mkdir(parents=True)
    records.atomic_write_yaml(folder / "spec.yaml", spec)
    records.write_status(folder, "failed", "diverged at step 3")
    return folder.name


def test_status_accepts_a_grid_folder_and_a_results_root(tmp_path, capsys):
    rid = _run(tmp_path / "results", "hash")
    (tmp_path / "results" / "quick" / "report").mkdir()  # a report folder is not a run
    for where in (tmp_path / "results" / "quick", tmp_path / "results"):
        assert main(["status", str(where)]) == 1  # a failed run
        out = capsys.readouterr().out
        assert f"grid quick ({tmp_path / 'results' / 'quick'})" in out
        assert rid in out and "diverged at step 3" in out and "report" not in out.split("\n", 1)[1]


def test_a_folder_without_runs_says_what_was_looked_for(tmp_path, capsys):
    (tmp_path / "quick" / "report").mkdir(parents=True)
    assert main(["status", str(tmp_path / "quick")]) == 1
    err = capsys.readouterr().err
    assert f"no run records under {tmp_path / 'quick'}" in err
    assert f"{tmp_path / 'quick'}/<run_id>/status.json" in err
    assert main(["status", str(tmp_path / "nope")]) == 1
    assert "no such folder" in capsys.readouterr().err
