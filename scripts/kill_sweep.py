#!/usr/bin/env python3
"""Random kill sweep: SIGKILL the launcher, a job, or both, at N seeded random moments of a small grid,
then rerun `moebench run` and check that every run is recorded exactly once and equals an
uninterrupted run (every metrics line less timing, final.json less cost / env).

Why: fixed kill moments test the moments someone thought of; a seeded sweep lands in startup, in a
write, between jobs and after the last one, and any failure names its trial, so it can be replayed
with the same seed.

The uninterrupted reference and the rerun after each kill train in this process (debug executor);
with --cluster slurm the rerun is `moebench run --cluster slurm`.

Usage (from the repository root, with the project's Python):
    .venv/bin/python scripts/kill_sweep.py -n 30 --seed 1 --cluster local --out /tmp/kill-sweep
    .venv/bin/python scripts/kill_sweep.py -n 5 --cluster slurm      # needs scripts/local-slurm.sh
Prints one line per trial (target, moment, what was killed, verdict) and a final count; writes
<out>/trials.jsonl; exits 1 when any trial lost, duplicated or changed a record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

TARGETS = ("launcher", "jobs", "both")
TRAIN = {"steps": 40, "batch_size": 16, "eval_every": 20, "checkpoint_every": 10, "probe_size": 8, "warmup_steps": 2}


def write_grid(folder: Path, name: str = "g") -> Path:
    """Two toy runs, one job at a time (so a kill can land between them); every trial has its own
    results folder, so run ids (and records) are the reference's."""
    grid = {
        "name": name,
        "task": "toy",
        "task_args": {"num_train": 64, "num_eval": 32},
        "moe": {"blocks": [-1], "num_experts": 4, "d_hidden": 16},
        "train": TRAIN,
        "seeds": [0],
        "routers": ["softmax-topk", "dense"],
        "executor": {"time_min": 10, "cpus_per_task": 1, "max_workers": 1, "array_parallelism": 1, "max_retries": 3},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run_dirs(path: Path, results: Path) -> dict[str, Path]:
    from moebench.grids.expand import expand
    from moebench.training.rundir import run_path
    from moebench.training.spec import run_id

    return {s["label"]: run_path(results, s["grid"], run_id(s)) for s in expand(path)}


def snapshot(dirs: dict[str, Path]) -> dict:
    """What must not depend on interruptions: metrics lines less timing, final.json less cost / env."""
    from moebench.training import records

    out = {}
    for label, d in dirs.items():
        lines = [
            {k: v for k, v in m.items() if k != "elapsed_s"}
            for m in records.read_jsonl(d / "metrics.jsonl", strict=True)
        ]
        final = {k: v for k, v in records.read_json(d / "final.json").items() if k not in ("cost", "env")}
        out[label] = (lines, final)
    return out


def launch(path: Path, results: Path, cluster: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moebench",
            "run",
            str(path),
            "--cluster",
            cluster,
            "--results",
            str(results),
            "--no-report",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def job_pids(dirs: dict[str, Path]) -> list[int]:
    """Processes training a run now (the holders of the run locks, on this host)."""
    from moebench.training.rundir import lock_owner

    return [o[1] for d in dirs.values() if (o := lock_owner(d))]


def kill(target: str, proc: subprocess.Popen, dirs: dict[str, Path], cluster: str) -> list[str]:
    """SIGKILL the target now; returns what was killed ("launcher", "job <pid>")."""
    killed = []
    if target in ("jobs", "both"):
        for pid in job_pids(dirs):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(f"job {pid}")
    if target in ("launcher", "both") and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if target == "both" and cluster == "local" else os.kill)(proc.pid, signal.SIGKILL)
            killed.append("launcher" + (" and its process group" if target == "both" and cluster == "local" else ""))
    return killed


def settle(proc: subprocess.Popen, dirs: dict[str, Path], name: str, cluster: str, timeout_s: float = 300) -> None:
    """Wait until nothing of the trial runs any more: the launcher, its orphaned local jobs, or its
    SLURM jobs (a killed launcher's jobs finish on their own)."""
    proc.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = bool(job_pids(dirs))
        if cluster == "local":
            try:
                os.killpg(proc.pid, 0)
                busy = True
            except ProcessLookupError:
                pass
        else:
            out = subprocess.run(
                ["squeue", "-h", "-n", f"moebench-{name}", "-o", "%i"], capture_output=True, text=True, timeout=30
            ).stdout
            busy = busy or bool(out.strip())
        if not busy:
            return
        time.sleep(0.2)
    raise TimeoutError(f"trial {name}: jobs still running {timeout_s:.0f}s after the kill")


def trial(i: int, rng: random.Random, args, reference: dict) -> dict:
    target = rng.choice(args.targets)
    moment = round(rng.uniform(0.0, args.max_s), 2)
    name = "g"
    folder = args.out / f"trial{i}"
    path = write_grid(folder, name)
    results = folder / "results"
    dirs = run_dirs(path, results)
    proc = launch(path, results, args.cluster)
    t0 = time.monotonic()
    time.sleep(moment)
    if target == "jobs":  # a job kill needs a job: wait for one to train (an OOM kill looks like this)
        deadline = time.monotonic() + 120
        while not job_pids(dirs) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    at = round(time.monotonic() - t0, 2)
    alive = proc.poll() is None
    killed = kill(target, proc, dirs, args.cluster)
    settle(proc, dirs, name, args.cluster)
    rc = rerun(path, results, args.cluster)
    problems = check(dirs, reference, rc)
    return {
        "trial": i,
        "target": target,
        "moment_s": moment,
        "killed_at_s": at,
        "launcher_alive": alive,
        "killed": killed,
        "rerun_rc": rc,
        "ok": not problems,
        "problems": problems,
        "wall_s": round(time.monotonic() - t0, 1),
    }


def rerun(path: Path, results: Path, cluster: str) -> int:
    """The user's next `moebench run`: in this process for the local executor (it trains in-process,
    one Python start less per trial), through SLURM for slurm. 0 when every run ended done."""
    if cluster == "slurm":
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "moebench",
                "run",
                str(path),
                "--cluster",
                cluster,
                "--results",
                str(results),
                "--no-report",
            ],
            capture_output=True,
            text=True,
        ).returncode
    from moebench.grids import launch as launcher

    out = launcher.run_grid(path, cluster="debug", results=results, log=lambda s: None)
    return 0 if out["counts"]["done"] == len(out["runs"]) else 1


def check(dirs: dict[str, Path], reference: dict, rc: int) -> list[str]:
    """Every run done once (status done, one final.json, each evaluation step once) and identical."""
    from moebench.training import records
    from moebench.training.rundir import inspect

    problems = [] if rc == 0 else [f"the rerun exited {rc}"]
    for label, d in dirs.items():
        st = inspect(d)
        if st["state"] != "done":
            problems.append(f"{label}: {st['state']} ({st['why']})")
            continue
        try:
            got = snapshot({label: d})[label]
        except records.CorruptRecordError as err:
            problems.append(f"{label}: {err}")
            continue
        steps = [m["step"] for m in got[0]]
        if len(steps) != len(set(steps)):
            problems.append(f"{label}: evaluation steps recorded twice: {steps}")
        if got != reference[label]:
            problems.append(f"{label}: records differ from the uninterrupted run")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=30, help="trials (default 30)")
    p.add_argument("--seed", type=int, default=1, help="seed of the targets and moments (default 1)")
    p.add_argument("--cluster", choices=("local", "slurm"), default="local")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from launcher,jobs,both")
    p.add_argument(
        "--max-s",
        type=float,
        default=10.0,
        dest="max_s",
        help="kill moments are uniform in [0, MAX_S] seconds after the launch (default 10); a "
        "`jobs` kill then waits for a job to be training",
    )
    p.add_argument("--out", type=Path, default=Path("/tmp/kill-sweep"), help="trial folders and trials.jsonl")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or not args.targets:
        p.error(f"--targets: unknown {bad or 'none given'}; choose from {','.join(TARGETS)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from moebench.grids import launch as launcher

    args.out.mkdir(parents=True, exist_ok=True)
    ref_path = write_grid(args.out / "reference")
    launcher.run_grid(ref_path, cluster="debug", results=args.out / "reference" / "results", log=lambda s: None)
    ref = snapshot(run_dirs(ref_path, args.out / "reference" / "results"))
    reference = {label: ref[label] for label in ref}
    rng = random.Random(args.seed)
    rows = []
    with open(args.out / "trials.jsonl", "w") as log:
        for i in range(args.n):
            row = trial(i, rng, args, reference)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(
                f"trial {i:>3}: kill {row['target']:<8} at {row['killed_at_s']:>5.2f}s "
                f"(drawn {row['moment_s']:.2f}s): "
                f"{', '.join(row['killed']) or 'nothing alive'}; "
                f"{'recorded once, identical' if row['ok'] else 'PROBLEM: ' + '; '.join(row['problems'])}",
                flush=True,
            )
    good = sum(r["ok"] for r in rows)
    print(
        f"kill sweep (seed {args.seed}, {args.cluster}): {good}/{len(rows)} trials recorded once and identical; "
        f"targets {dict((t, sum(r['target'] == t for r in rows)) for t in args.targets)}; "
        f"something killed in {sum(bool(r['killed']) for r in rows)}"
    )
    return 0 if good == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
