"""Read every run record under a results folder into pandas frames, without ever crashing on a bad
record: unreadable files become a listed problem and a run in state ``corrupt``.

``results`` may be one grid (``results/<grid>/<run_id>/``) or a parent of several grids. The grid of a
run is the name of the folder holding its run folder (the layout ``results/<grid>/<run_id>``).

Missing runs: the launcher writes ``<results>/<grid>/expected.json``, a JSON list of
``{"run_id", "label", "task", "seed", "sweep"}``, one per run the grid expands to. A listed run with
no record folder becomes a row in state ``missing``; without the file, missing runs are detected only
as seeds that other routers of the same task have and this one lacks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from moebench.training.records import CorruptRecordError, read_json, read_jsonl, read_spec
from moebench.training.rundir import inspect

RECORD_FILES = ("spec.yaml", "status.json", "final.json", "metrics.jsonl")
EXPECTED_FILE = "expected.json"
ROUTING_STATS = (
    "load_cv",
    "max_mean",
    "norm_entropy",
    "gini",
    "dead_experts",
    "drop_rate",
    "balance",
    "gate_entropy",
    "margin",
    "fallback_rate",
    "unrouted_rate",
    "switch_rate",
    "mutual_info",
    "mutual_info_norm",
)
COST_KEYS = (
    "params_total",
    "params_active",
    "flops_per_token",
    "router_params",
    "router_flops_per_token",
    "ms_per_step",
    "wall_time_s",
    "tokens_per_s",
    "peak_memory_mb",
)
ID_COLS = ("grid", "run_id", "bench", "task", "label", "variant", "seed")
#: does the router route? per run (routing.mean) and per layer (columns ``<key>.layer<i>``)
ROUTES_KEYS = ("first_choice_max_share_init", "first_choice_max_share", "collapsed", "moved_from_init")
NOT_DONE = ("failed", "missing", "queued", "running", "interrupted", "new", "corrupt")


@dataclass
class RecordSet:
    """All records under one results folder: ``runs`` (one row per run), ``layers`` (one row per run
    and MoE layer, from final.json), ``evals`` (one row per run and evaluation, from metrics.jsonl),
    ``problems`` (human-readable lines about unreadable or inconsistent records), ``probes`` (one row
    per run and probe point: the switch rate since the previous one, from final.json)."""

    root: Path
    runs: pd.DataFrame
    layers: pd.DataFrame
    evals: pd.DataFrame
    problems: list[str] = field(default_factory=list)
    grids_with_expected: set[str] = field(default_factory=set)
    probes: pd.DataFrame = field(default_factory=pd.DataFrame)


def load_records(results_dir) -> pd.DataFrame:
    """One row per run (done, failed, queued, running, corrupt, or missing from expected.json)."""
    return load_record_set(results_dir).runs


def load_record_set(results_dir) -> RecordSet:
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"results folder {root} does not exist; run a grid first (`moebench run`) "
            f"or pass the folder that holds <grid>/<run_id>/ record folders"
        )
    runs, layers, evals, problems, probes = [], [], [], [], []
    for run_dir in sorted(find_run_dirs(root)):
        row, lay, ev, probs = _read_run(run_dir)
        probes += row.pop("_probes", [])
        runs.append(row)
        layers += lay
        evals += ev
        problems += probs
    grids_with_expected = set()
    for exp_path in find_expected_files(root):
        grids_with_expected.add(exp_path.parent.name)
        missing, probs = _missing_runs(exp_path, {r["run_id"] for r in runs})
        runs += missing
        problems += probs
    frame = _finish_runs(pd.DataFrame(runs), problems)
    _fill_declared_margins(frame)
    _fill_switch_from_evals(frame, evals)
    lay_frame, ev_frame, probe_frame = (_attach_ids(pd.DataFrame(x), frame) for x in (layers, evals, probes))
    return RecordSet(root, frame, lay_frame, ev_frame, problems, grids_with_expected, probe_frame)


def find_run_dirs(root: Path, max_depth: int = 3):
    """Folders holding at least one record file, down to results/<grid>/<run_id> (and one level more)."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if any(name in filenames for name in RECORD_FILES):
            dirnames[:] = []
            yield here
            continue
        depth = len(here.relative_to(root).parts)
        dirnames[:] = [] if depth >= max_depth else sorted(d for d in dirnames if not d.startswith("."))


def find_expected_files(root: Path) -> list[Path]:
    return sorted(p for p in [root / EXPECTED_FILE, *root.glob(f"*/{EXPECTED_FILE}")] if p.is_file())


def _safe(read, path, problems):
    try:
        return read(path)
    except CorruptRecordError as err:
        problems.append(str(err))
        return CorruptRecordError


def _name(value):
    """Spec entries may be a plain name or a dict with a name."""
    if isinstance(value, dict):
        return value.get("name")
    return value


_LAYER_RAW = (
    "counts",
    "label_by_expert",
    "label_unrouted",
    "top1_counts",
    "labels",
    "final_switch",
    "overlap_with_final",
)


def _read_run(run_dir: Path):
    problems: list[str] = []
    spec_ok, final_ok, metrics, state, reason = _read_records(run_dir, problems)
    row = _run_row(run_dir, spec_ok, final_ok, state, reason)
    routing = final_ok.get("routing") or {}
    _add_routing_columns(row, routing)
    for key, value in (final_ok.get("cost") or {}).items():
        row[key] = _num(value)
    row["device"] = device_name(final_ok.get("env"))
    for key, value in (final_ok.get("metrics") or {}).items():
        row[f"metric.{key}"] = _num(value)
    if row["label"] is None and state != "missing":
        problems.append(f"{run_dir}: no readable spec.yaml or final.json, so its router and task are unknown")
    layers = _layer_entries(run_dir, row, routing, problems)
    evals = _eval_entries(row["run_id"], metrics)
    return row, layers, evals, problems


def _read_records(run_dir: Path, problems: list[str]):
    """spec.yaml, final.json (only a done run's) and metrics.jsonl as read, with the run's state and why."""
    seen: list[str] = []  # what is wrong with spec / status / final, the verdict below says once
    spec = _safe(read_spec, run_dir, seen)
    final = _safe(read_json, run_dir / "final.json", seen)
    metrics = _safe(read_jsonl, run_dir / "metrics.jsonl", problems)
    spec_ok = spec if isinstance(spec, dict) else {}
    final_ok = final if isinstance(final, dict) else {}
    # one verdict: the state and words `moebench status` and the launcher give (rundir.inspect); only a
    # done run's final.json is counted, so a damaged or unfinished record never enters a table
    verdict = inspect(run_dir, require_resolvable=False)
    state, reason = verdict["state"], verdict["why"] or None
    if state == "corrupt":
        final_ok, metrics = {}, []
        problems.append(f"{run_dir}: {reason}")
    elif state != "done":
        final_ok = {}
    return spec_ok, final_ok, metrics, state, reason


def _run_row(run_dir: Path, spec_ok: dict, final_ok: dict, state: str, reason: str | None) -> dict:
    """A run's identity, state and headline: the first columns of its row."""
    sweep = final_ok.get("sweep") or spec_ok.get("sweep") or {}
    moe = spec_ok.get("moe")
    headline = final_ok.get("headline") or {}
    return {
        "grid": run_dir.parent.name,
        "run_id": final_ok.get("run_id") or run_dir.name,
        "run_dir": str(run_dir),
        "task": _name(final_ok.get("task") or spec_ok.get("task")),
        "label": _name(final_ok.get("label") or spec_ok.get("label") or final_ok.get("router")),
        "router": final_ok.get("router") or (_name(moe.get("router")) if isinstance(moe, dict) else "dense"),
        "seed": final_ok.get("seed", spec_ok.get("seed")),
        "sweep": dict(sweep),
        "state": state,
        "reason": reason,
        "headline_name": headline.get("name"),
        "headline_value": _num(headline.get("value")),
        "higher_is_better": headline.get("higher_is_better"),
        "equivalence_margin": _num(headline.get("margin")),  # "margin" is the gate's top-1 margin statistic
        "equivalence_margin_reason": headline.get("margin_reason")
        if isinstance(headline.get("margin_reason"), str)
        else None,
        "moe_mode": (moe.get("mode") or "replace") if isinstance(moe, dict) else None,
        "data": _data_name(spec_ok.get("task_args")),
    }


def _add_routing_columns(row: dict, routing: dict) -> None:
    """The routing means, the final-switch mean, per-layer route columns and the probe points."""
    for key, value in (routing.get("mean") or {}).items():
        row[key] = _num(value)
    row["final_switch"] = _final_switch(routing.get("final_switch"))
    for i, layer in enumerate(routing.get("per_layer") or []):
        for key in ROUTES_KEYS:
            if isinstance(layer, dict) and key in layer:
                row[f"{key}.layer{i}"] = _num(layer[key])
    probe = routing.get("probe") or {}
    row["_probes"] = [
        {"run_id": row["run_id"], "step": st, "switch_rate": _num(sw)}
        for st, sw in zip(probe.get("steps") or [], probe.get("switch_rate") or [])
    ]


def _layer_entries(run_dir: Path, row: dict, routing: dict, problems: list[str]) -> list[dict]:
    """One entry per MoE layer (its per-layer columns also go into ``row``); a malformed one is skipped."""
    layers = []
    for i, layer in enumerate(routing.get("per_layer") or []):
        if not isinstance(layer, dict):
            problems.append(f"{run_dir}: final.json routing.per_layer[{i}] is not a mapping; skipped")
            continue
        row.update(per_layer_columns(layer, i))
        entry = {"run_id": row["run_id"], "layer_idx": i, "layer": str(layer.get("layer", f"layer{i}"))}
        for key, value in layer.items():
            if key in _LAYER_RAW:
                entry[key] = value
            elif key != "layer":
                entry[key] = _num(value)
        layers.append(entry)
    return layers


def _eval_entries(run_id: str, metrics) -> list[dict]:
    """One entry per evaluation line of metrics.jsonl."""
    evals = []
    for line in metrics if isinstance(metrics, list) else []:
        entry = {
            "run_id": run_id,
            "step": line.get("step"),
            "train_loss": _num(line.get("train_loss")),
            "lr": _num(line.get("lr")),
        }
        for key, value in (line.get("metrics") or {}).items():
            entry[f"metric.{key}"] = _num(value)
        for key, value in ((line.get("routing") or {}).get("mean") or {}).items():
            entry[key] = _num(value)
        evals.append(entry)
    return evals


def device_name(env) -> str | None:
    """The device a run trained on, as final.json's env names it: the GPU's name, else the CPU model."""
    if not isinstance(env, dict):
        return None
    if str(env.get("train_device", "")).startswith("cuda") and isinstance(env.get("device"), str):
        return env["device"]
    cpu = env.get("cpu_model") or env.get("processor")
    return f"CPU ({cpu})" if isinstance(cpu, str) and cpu else ("CPU" if env.get("train_device") == "cpu" else None)


def per_layer_columns(layer: dict, i: int) -> dict[str, float]:
    """``<stat>.layer<i>`` for every scalar statistic of MoE layer ``i`` (the ones `routing.mean` averages),
    so a statistic added to final.json becomes a runs.csv column by itself."""
    return {
        f"{key}.layer{i}": _num(value)
        for key, value in layer.items()
        if key not in ("layer", "tokens") and (value is None or isinstance(value, (int, float)))
    }


def _data_name(task_args) -> str | None:
    """The dataset a task ran on when its task_args name one (``dataset`` / ``data``), else None
    (the task's offline default)."""
    if not isinstance(task_args, dict):
        return None
    value = task_args.get("dataset", task_args.get("data"))
    return str(value) if isinstance(value, (str, int)) else None


def _num(value) -> float:
    """A float, NaN for anything that is not a number (None, strings, nested lists)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return math.nan


def _final_switch(value) -> float:
    """StableMoE's fluctuation as one number: final.json's {"steps", "per_eval", "mean"} gives its mean;
    a bare per-evaluation list gives the mean without the last entry (0 by definition)."""
    if isinstance(value, dict):
        value = value.get("mean")
    if isinstance(value, list):
        vals = [_num(v) for v in value[:-1]]
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan
    return _num(value)


def _missing_runs(path: Path, present: set[str]):
    problems: list[str] = []
    try:
        listed = read_json(path)
    except CorruptRecordError as err:
        return [], [f"{err} (missing runs cannot be detected for this grid)"]
    if not isinstance(listed, list):
        return [], [
            f"{path}: expected a JSON list of runs, got {type(listed).__name__}; "
            f"the launcher must write [{{run_id, label, task, seed, sweep}}, ...]"
        ]
    rows = []
    for entry in listed:
        if not isinstance(entry, dict) or "run_id" not in entry:
            problems.append(f"{path}: entry {entry!r} has no run_id; skipped")
            continue
        if entry["run_id"] in present:
            continue
        rows.append(
            {
                "grid": path.parent.name,
                "run_id": entry["run_id"],
                "run_dir": None,
                "task": _name(entry.get("task")),
                "label": _name(entry.get("label")),
                "router": None,
                "seed": entry.get("seed"),
                "sweep": dict(entry.get("sweep") or {}),
                "state": "missing",
                "reason": "listed in expected.json but no record folder exists",
            }
        )
    return rows, problems


def variant_name(sweep: dict) -> str:
    """A sweep point as text, e.g. 'num_experts=8, top_k=1' ('' for no sweep)."""
    return ", ".join(f"{k}={v}" for k, v in sorted((sweep or {}).items()))


def _finish_runs(frame: pd.DataFrame, problems: list[str]) -> pd.DataFrame:
    """Add variant, bench and sweep columns; fill headline name / direction for runs without one."""
    base = [
        "grid",
        "run_id",
        "run_dir",
        "task",
        "label",
        "router",
        "seed",
        "sweep",
        "state",
        "reason",
        "headline_name",
        "headline_value",
        "higher_is_better",
    ]
    for col in base:
        if col not in frame:
            frame[col] = pd.Series(dtype=object if col not in ("headline_value",) else float)
    if frame.empty:
        frame["variant"] = pd.Series(dtype=object)
        frame["bench"] = pd.Series(dtype=object)
        return frame
    frame["variant"] = frame["sweep"].map(variant_name)
    for axis in sorted({k for s in frame["sweep"] for k in s}):
        frame[f"sweep.{axis}"] = frame["sweep"].map(lambda s, a=axis: s.get(a))
    grids_per_task = frame.dropna(subset=["task"]).groupby("task")["grid"].nunique()
    frame["bench"] = [
        None
        if t is None or (isinstance(t, float) and math.isnan(t))
        else (t if grids_per_task.get(t, 1) <= 1 else f"{t} [{g}]")
        for t, g in zip(frame["task"], frame["grid"])
    ]
    for bench, g in frame.dropna(subset=["bench"]).groupby("bench"):
        names = g["headline_name"].dropna().unique()
        dirs = g["higher_is_better"].dropna().unique()
        if len(names) > 1 or len(dirs) > 1:
            problems.append(
                f"task {bench}: runs disagree on the headline metric {list(names)} / "
                f"higher_is_better {list(dirs)}; the first is used"
            )
        if len(names):
            frame.loc[g.index, "headline_name"] = names[0]
        if len(dirs):
            frame.loc[g.index, "higher_is_better"] = bool(dirs[0])
    dup = frame[frame["state"] == "done"].duplicated(subset=["bench", "label", "variant", "seed"], keep=False)
    for _, r in frame[dup.reindex(frame.index, fill_value=False)].iterrows():
        problems.append(
            f"{r['run_dir']}: duplicate of {r['bench']} / {r['label']} / seed {r['seed']} "
            f"({r['variant'] or 'no sweep'}); the seed's runs are averaged"
        )
    return frame.sort_values(
        ["bench", "label", "variant", "seed"],
        na_position="last",
        kind="stable",
        key=lambda s: s.astype(str) if s.name != "seed" else s,
    ).reset_index(drop=True)


def _fill_switch_from_evals(frame: pd.DataFrame, evals: list[dict]) -> None:
    """Stability at the last evaluation: final.json's switch_rate, else the last metrics.jsonl value."""
    if frame.empty:
        return
    last = {}
    for e in evals:
        if not math.isnan(e.get("switch_rate", math.nan)):
            last[e["run_id"]] = e["switch_rate"]
    if "switch_rate" not in frame:
        frame["switch_rate"] = math.nan
    fill = frame["run_id"].map(last)
    frame["switch_rate"] = frame["switch_rate"].where(frame["switch_rate"].notna(), fill).astype(float)


def _attach_ids(part: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Repeat the run's identity (grid, bench, label, variant, seed, state) on per-layer / per-eval rows."""
    ids = ["run_id", "grid", "bench", "task", "label", "variant", "seed", "state"]
    if part.empty:
        return pd.DataFrame(columns=ids)
    ident = runs[ids].drop_duplicates("run_id")
    return part.merge(ident, on="run_id", how="left")


def _fill_declared_margins(frame: pd.DataFrame) -> None:
    """Runs recorded before final.json carried the task's equivalence margin take the one the task
    class declares today (``Task.margin``); a task that cannot be imported keeps NaN (no TOST)."""
    if frame.empty or "equivalence_margin" not in frame:
        return
    for task in frame.loc[frame["equivalence_margin"].isna(), "task"].dropna().unique():
        margin, reason = declared_margin(str(task))
        rows = frame["equivalence_margin"].isna() & (frame["task"] == task)
        frame.loc[rows, "equivalence_margin"] = margin
        frame.loc[rows, "equivalence_margin_reason"] = reason


def declared_margin(task: str) -> tuple[float, str | None]:
    """(margin, reason) from the registered task class; (NaN, None) when it is unknown or declares none."""
    try:
        from moebench.core.registry import TASKS

        cls = TASKS.get(task)
    except Exception:  # noqa: BLE001 - an unknown or broken task simply has no declared margin
        return math.nan, None
    margin = getattr(cls, "margin", None)
    return (_num(margin), getattr(cls, "margin_reason", None) or None) if margin is not None else (math.nan, None)
