"""Data parallel through a real SLURM: a 2-task CPU job (submitit -> SLURM environment ->
init_process_group(gloo) -> the trainer's all-reduce) matches one process with the same global
batch, only rank 0 writes, and a requeued 2-task job resumes to the same result. Needs the one-node
cluster of scripts/local-slurm.sh (2 CPUs); skips, saying why, without it."""

from __future__ import annotations

import subprocess

import pytest
from slurm_cluster import final_state, node_cpus, not_ready, wait_for

from moebench.grids import launch
from moebench.training import records, rundir, runner
from moebench.training.rundir import run_path
from moebench.training.spec import resolve_spec, run_id

pytestmark = pytest.mark.slurm
EXECUTOR = {"time_min": 15, "cpus_per_task": 1, "tasks_per_node": 2}


@pytest.fixture(scope="module", autouse=True)
def slurm_ready():
    why = not_ready()
    if why:
        pytest.skip(why)
    if node_cpus() < 2:  # one CPU per task: a 2-task job would wait forever
        pytest.skip(f"the SLURM node has {node_cpus()} CPU(s); a 2-task job needs 2 (a machine with 2+ cores)")


def _spec(grid: str, steps: int, eval_every: int, checkpoint_every: int) -> dict:
    # softmax-topk: no auxiliary loss, whose balance term would depend on the per-rank batch
    return resolve_spec(
        {
            "grid": grid,
            "task": "toy",
            "task_args": {"num_train": 128, "num_eval": 32},
            "model": {"dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
            "moe": {"blocks": "all", "num_experts": 4, "router": "softmax-topk", "router_args": {}},
            "label": "softmax-topk",
            "seed": 0,
            "train": {
                "steps": steps,
                "batch_size": 32,
                "lr": 3e-3,
                "warmup_steps": 1,
                "eval_every": eval_every,
                "checkpoint_every": checkpoint_every,
                "probe_size": 8,
            },
        }
    )


def _one_process(spec, tmp_path) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    runner.execute(spec, tmp_path / "single", progress=False)
    return records.read_jsonl(tmp_path / "single" / spec["grid"] / run_id(spec) / "metrics.jsonl", strict=True)


def _same_as(lines: list[dict], ref: list[dict]) -> None:
    """The tolerance of tests/test_data_parallel.py: gloo's sum order differs from one process's."""
    print(
        f"2 tasks vs 1 process at step {ref[-1]['step']}: train_loss {lines[-1]['train_loss']!r} vs "
        f"{ref[-1]['train_loss']!r}; metrics {lines[-1]['metrics']} vs {ref[-1]['metrics']}"
    )
    assert [m["step"] for m in lines] == [m["step"] for m in ref]  # no duplicate, none missing
    for a, b in zip(ref, lines, strict=True):
        if a["train_loss"] is None:  # the step-0 evaluation (every MoE run), before any training step
            assert b["train_loss"] is None, a["step"]
        else:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5), a["step"]
        for k in a["metrics"]:
            assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-4, abs=1e-6), (a["step"], k)


def _submit(spec, results):
    executor = launch.make_executor("slurm", results / spec["grid"] / ".submitit", EXECUTOR, "dp")
    return executor.submit(launch.RunJob(threads=1), spec, str(results))


def _rank0_only(d, attempts: int) -> None:
    """One jobs.jsonl line per attempt, each from global rank 0 of 2 tasks; nothing but the record."""
    jobs = records.read_jsonl(d / rundir.JOBS_LOG, strict=True)
    assert [(j["global_rank"], j["num_tasks"]) for j in jobs] == [(0, 2)] * attempts, jobs
    assert records.read_status(d)["owner"].endswith(f":{jobs[-1]['pid']}")  # rank 0 wrote status.json
    assert {p.name for p in d.iterdir()} <= {
        "spec.yaml",
        "status.json",
        "metrics.jsonl",
        "final.json",
        "eval_items.npz",
        "probe_top1.npz",
        "checkpoint.pt",
        "jobs.jsonl",
        ".lock",
        ".stale",
    }


def test_a_two_task_slurm_job_equals_one_process_and_only_rank0_writes(tmp_path):
    spec = _spec("slurm-dp", steps=30, eval_every=10, checkpoint_every=10)
    results = tmp_path / "results"
    job = _submit(spec, results)
    ref = _one_process(spec, tmp_path)  # meanwhile, in this process
    d = run_path(results, spec["grid"], run_id(spec))
    status = final_state(d, job.job_id, timeout_s=300)
    assert status["state"] == "done", f"{status}; log: {job.paths.stderr}"
    rank0, rank1 = job.results()
    assert rank0["state"] == "done" and rank1 == {"run_id": d.name, "state": "worker", "reason": None}
    _same_as(records.read_jsonl(d / "metrics.jsonl", strict=True), ref)
    _rank0_only(d, attempts=1)


def test_a_requeued_two_task_job_resumes_to_the_same_result(tmp_path):
    spec = _spec("slurm-dp-requeue", steps=400, eval_every=100, checkpoint_every=25)
    results = tmp_path / "results"
    job = _submit(spec, results)
    d = run_path(results, spec["grid"], run_id(spec))
    wait_for(lambda: (d / "checkpoint.pt").exists(), f"a checkpoint (log: {job.paths.stderr})", 240, 0.3)
    # USR2 to both tasks, as SLURM preempts: rank 0 checkpoints (submitit) and requeues the job
    subprocess.run(["scancel", job.job_id, "--signal", "USR2"], check=True, timeout=30)
    ref = _one_process(spec, tmp_path)  # meanwhile, in this process
    status = final_state(d, job.job_id, timeout_s=480)
    assert status["state"] == "done", f"{status}; log: {job.paths.stderr}"
    assert status["attempts"] == 2 and isinstance(status.get("resumed_from"), int), status
    _same_as(records.read_jsonl(d / "metrics.jsonl", strict=True), ref)
    _rank0_only(d, attempts=2)
    restarts = [j["slurm_restart_count"] for j in records.read_jsonl(d / rundir.JOBS_LOG)]
    assert restarts == [0, 1]  # the same job, requeued by SLURM
