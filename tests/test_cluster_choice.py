"""`cluster: auto` never submits to a SLURM cluster the user did not name, and says what it chose
and why on the first line (issue 13: a quick grid once queued behind another user's cluster)."""

import pytest
import yaml

from moebench.grids import launch


@pytest.fixture
def slurm_here(monkeypatch):
    """A machine where sbatch is installed and a controller answers."""
    monkeypatch.setattr(launch.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(launch, "slurm_available", lambda: True)


def test_auto_without_a_partition_stays_local_even_where_slurm_answers(slurm_here):
    cluster, why = launch.explain_cluster(None, "auto", None)
    assert cluster == "local"
    assert "declares no executor.partition" in why and "--cluster slurm" in why


def test_auto_with_a_partition_uses_slurm_where_it_answers(slurm_here, monkeypatch):
    assert launch.explain_cluster(None, "auto", "gpu") == (
        "slurm",
        "executor.cluster is auto, the grid declares partition 'gpu' and SLURM answers",
    )
    monkeypatch.setattr(launch, "slurm_available", lambda: False)
    cluster, why = launch.explain_cluster(None, "auto", "gpu")
    assert cluster == "local" and "no SLURM controller answers" in why


def test_a_named_cluster_wins(slurm_here):
    assert launch.explain_cluster("local", "auto", "gpu") == ("local", "--cluster local")
    assert launch.explain_cluster("slurm", "auto", None) == ("slurm", "--cluster slurm")
    assert launch.explain_cluster(None, "slurm", None) == ("slurm", "the grid's executor.cluster is slurm")
    assert launch.choose_cluster(None, "auto", None) == "local"


def test_run_says_which_executor_and_why_on_its_first_line(slurm_here, tmp_path):
    grid = {
        "name": "tiny",
        "task": "toy",
        "task_args": {"num_train": 64, "num_eval": 32},
        "moe": {"blocks": [-1], "num_experts": 4, "d_hidden": 32},
        "train": {"steps": 2, "batch_size": 8},
        "seeds": [0],
        "routers": ["dense"],
    }
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    lines: list[str] = []
    launch.run_grid(path, results=tmp_path / "results", dry_run=True, log=lines.append)
    assert lines[0].startswith(
        "executor: local (executor.cluster is auto and the grid declares no "
        "executor.partition; SLURM is installed here: pass --cluster slurm"
    )
