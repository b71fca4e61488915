"""The pretrain stage: a dense model trained first, once per seed, that every run of a grid block
starts from (the pretrained regime: upcycle its MLPs into experts, or add adapters to it).

Why a stage and not a flag: sparse upcycling, V-MoE, Soft MoE, EMoE and ERMoE all start from a
trained dense model; from random weights an eigenbasis router routes on noise. The dense model is an
ordinary dense run (same task, task_args, model and seed; its own train budget from ``pretrain:``),
so it is trained, checkpointed, resumed, failed and reported exactly like any run, by the same code:

- **Content-addressed cache.** Its spec is resolved like any run's; its run id (a hash of the
  resolved spec, which carries the code version in ``match``) names its folder
  ``<results>/.pretrain/pretrain/<run_id>/``. Grids sharing a results folder (``quick`` and
  ``quick-adapter``) share it, and a routers-only change of a grid never retrains it. The folder is
  hidden, so reports and ``moebench status results`` do not list it as a grid
  (``moebench status results/.pretrain`` does).
- **Dependency.** ``moebench.grids.launch.run_grid`` runs the pretraining runs first (one phase,
  ``moebench.grids.phase.run_phase``, through the same submitit executor: local subprocesses or a SLURM array), then the runs that need them. A
  pretraining run that failed or did not finish holds back its dependants with the reason; the
  next ``moebench run`` resumes it from its checkpoint (``--retry-failed`` reruns a failed one).
- **Loading**: every dependent run's spec gets ``model.pretrained: "pretrain:<id>"`` (the pretraining
  run's id, not a path), so its run id differs from the from-scratch run, names the exact weights and
  does not depend on where the results folder lives. The runner resolves it to
  ``<results>/.pretrain/pretrain/<id>/weights.pt`` when the run starts (``moebench.training.pretrained``)
  and loads it through the existing ``model.pretrained: /path`` path (``moebench.core.models``).
- **Only when needed**: the launcher runs a pretrain only for dependants that are not done yet, so a
  finished grid (a fresh clone of the committed sample) plans nothing.
- **Weights file.** The pretraining run keeps its last checkpoint; the launcher extracts the model's
  state dict into ``weights.pt`` (reading the checkpoint with ``weights_only=True`` and numpy's array
  reconstruction allowed, nothing else: results folders are untrusted input) and removes the checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from moebench.grids.phase import Executor, Phase, plan, run_phase
from moebench.grids.planned import PlannedRun
from moebench.training.pretrained import PRETRAIN_DIR, PRETRAIN_GRID, WEIGHTS, pretrain_ref, pretrain_root
from moebench.training.rundir import inspect, run_lock, run_path, set_aside
from moebench.training.spec import RunSpec

__all__ = ["PRETRAIN_DIR", "PRETRAIN_GRID", "WEIGHTS", "pretrain_root"]  # re-exported: the stage's layout

DEFAULT_RESULTS = "results"  # `moebench run --results`' default: what `grid show` assumes
PRETRAIN_LABEL = "pretrain"
CHECKPOINT = "checkpoint.pt"


def pretrain_spec(task: str, task_args: dict, model: dict, seed: int, train: dict, overrides: dict) -> RunSpec:
    """The `RunSpec` of the dense pretraining run for one (task, task_args, model, seed):
    ``train`` (the block's) with ``overrides`` (its ``pretrain:`` section) on top; it keeps its checkpoint
    so the weights can be extracted. The code version goes into ``match`` (hashed like the rest)."""
    from moebench.version import __version__

    return RunSpec.from_dict(
        {
            "grid": PRETRAIN_GRID,
            "task": task,
            "task_args": copy.deepcopy(task_args),
            "model": copy.deepcopy(model),
            "moe": None,
            "label": PRETRAIN_LABEL,
            "seed": seed,
            "train": {**copy.deepcopy(train), **copy.deepcopy(overrides), "keep_checkpoint": True},
            "sweep": {},
            "match": {"stage": "dense pretrain", "code_version": __version__},
        }
    )


def pretrain_dir(results, spec: RunSpec) -> Path:
    return run_path(pretrain_root(results), spec.grid, spec.run_id)


def reference(spec: RunSpec) -> str:
    """What a dependent run's ``model.pretrained`` says: ``pretrain:<this pretraining run's id>``."""
    return pretrain_ref(spec.run_id)


def dependent_model(model: dict, ref: str) -> dict:
    """A dependent run's model section: the same model, loaded strictly from the dense weights."""
    out = {k: copy.deepcopy(v) for k, v in model.items() if k != "pretrained_strict"}
    out["pretrained"] = ref
    return out


# -- weights ------------------------------------------------------------------------------------------
def _read_checkpoint_model(path: Path) -> dict:
    """The ``model`` state dict of a training checkpoint, read with ``weights_only=True``: tensors,
    plain containers and numpy arrays (the checkpoint's RNG state) only, never arbitrary objects."""
    import numpy as np
    import torch

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed: list[Any] = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        ck = torch.load(path, map_location="cpu", weights_only=True)
    state = ck.get("model") if isinstance(ck, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no model state dict under 'model'")
    return state


def extract_weights(run_dir) -> bool:
    """Make ``<run_dir>/weights.pt`` from the finished run's checkpoint (once; atomic); True when the
    weights file is there afterwards."""
    import torch

    from moebench.training.records import atomic_write

    run_dir = Path(run_dir)
    if (run_dir / WEIGHTS).is_file():
        return True
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        return False
    try:
        state = _read_checkpoint_model(ckpt)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: the run is trained again
        return False
    atomic_write(run_dir / WEIGHTS, lambda f: torch.save(state, f))
    ckpt.unlink()
    return True


# -- the launcher's phase -----------------------------------------------------------------------------
def pretrain_phase(
    pretrains: list[RunSpec], results, ex: Executor, grid_name: str, retry_failed: bool = False, dry_run: bool = False
) -> dict:
    """Run the dense pretraining runs that are not done yet (through the grid's executor) and wait.
    Returns ``{reference: why its weights are not available}`` for each one that did not finish, so the
    launcher can hold back its dependants instead of starting them from missing weights."""
    if not pretrains:
        return {}
    root = pretrain_root(results)
    specs = list(pretrains)
    for spec in specs:  # done but without weights (deleted, or the launcher died before extracting): redo
        d = pretrain_dir(results, spec)
        if inspect(d)["state"] == "done" and not extract_weights(d) and not dry_run:
            with run_lock(d) as got:
                if got:
                    set_aside(d, ["status.json", "final.json", CHECKPOINT])
    runs = plan(specs, root, retry_failed, ex.section.get("max_retries", 2))
    ex.log(
        f"pretrain: {len(runs)} dense runs (one per task block and seed) -> {root / PRETRAIN_GRID}; "
        f"{sum(r.why == 'done' for r in runs)} done already, "
        f"{sum(r.action == 'run' for r in runs)} to run first"
    )
    run_phase(runs, Phase(f"{grid_name}-pretrain", root / PRETRAIN_GRID, root.resolve(), verb="pretrain"), ex, dry_run)
    if dry_run:
        return {}
    blocked = {}
    for p in pretrains:
        ref = reference(p)
        d = pretrain_dir(results, p)
        st = inspect(d)
        if st["state"] == "done" and extract_weights(d):
            continue
        why = f"{st['state']}" + (f": {st['reason']}" if st["reason"] else "")
        if st["state"] == "failed" and not retry_failed:
            why += "; fix it and rerun with --retry-failed"
        blocked[ref] = f"its dense pretrain {p.run_id} is {why}"
    return blocked


def hold_back(runs: list[PlannedRun], blocked: dict) -> list[PlannedRun]:
    """``runs``, with every planned run whose pretrained weights are not there a skip (with the reason)."""
    return [
        r.replace(action="skip", why=f"waits: {blocked[r.pretrain]}")
        if r.action == "run" and r.pretrain in blocked
        else r
        for r in runs
    ]


def needed(pretrains: list[RunSpec], runs: list[PlannedRun]) -> list[RunSpec]:
    """The pretrains that a planned run still to run starts from; a finished grid needs none."""
    refs = {r.pretrain for r in runs if r.action == "run"}
    return [p for p in pretrains if reference(p) in refs]
