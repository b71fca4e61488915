"""Status tables: the state of every run of a grid folder, read from its records alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moebench.training import records
from moebench.training.rundir import inspect, verdict_text

if TYPE_CHECKING:
    from moebench.grids.planned import PlannedRun

SUMMARY_STATES = ("done", "running", "failed", "queued")


def _reason(st: dict) -> str:
    """The state's reason (`rundir.inspect`'s ``why``: `rundir.verdict_text`, the words the launcher and
    the report use too)."""
    return str(st["why"] or "")


def plan_rows(runs: list[PlannedRun]) -> list[dict]:
    """One row per planned run of the launcher (run id, label, seed, state, reason), read from its folder."""
    rows = []
    for r in runs:
        st = inspect(r.run_dir)
        state = st["state"]
        if r.outcome == "elsewhere" and state not in ("done", "failed"):
            state = "running"
        rows.append(
            {
                "run_id": r.run_id,
                "label": r.spec.label,
                "seed": r.spec.seed,
                "state": state,
                "attempts": st["attempts"],
                "reason": _reason(st) or ("running elsewhere" if r.outcome == "elsewhere" else _resumed(r.run_dir, st)),
            }
        )
    return rows


def _resumed(run_dir, st: dict) -> str:
    """ "resumed from step N (attempt M)" when the latest attempt continued from a checkpoint
    (``resumed_from`` in status.json, written by the trainer), so a requeue is visible."""
    status = records.read_status_safe(run_dir) if st["state"] != "corrupt" else None
    step = status.get("resumed_from") if isinstance(status, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return ""
    return f"resumed from step {step} (attempt {st['attempts']})"


def _bucket(state: str) -> str:
    """Summary buckets: done / running / failed / queued (new, interrupted and corrupt count as queued,
    i.e. still to run)."""
    return state if state in SUMMARY_STATES else "queued"


def count_states(rows: list[dict]) -> dict:
    """How many rows (`plan_rows`, `status_rows`) are done / running / failed / queued."""
    return _count(r["state"] for r in rows)


def count_planned(runs: list[PlannedRun]) -> dict:
    """How many planned runs' folders are done / running / failed / queued now."""
    return _count(inspect(r.run_dir)["state"] for r in runs)


def _count(states) -> dict:
    counts = {s: 0 for s in SUMMARY_STATES}
    for state in states:
        counts[_bucket(state)] += 1
    return counts


def format_table(rows: list[dict], title: str = "") -> str:
    """The status table (run, label, seed, state, attempts, reason) and a done/running/failed/queued count."""
    counts = count_states(rows)
    head = ["run_id", "label", "seed", "state", "attempts", "reason"]
    body = [[str(r[h]) if r[h] is not None else "" for h in head] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head[:-1])]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head[:-1], widths)) + "  reason")
    for b in body:
        lines.append(("  ".join(c.ljust(w) for c, w in zip(b[:-1], widths)) + "  " + b[-1]).rstrip())
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()) + f" (of {len(rows)})")
    return "\n".join(lines)


def grid_dirs(path: Path) -> list[Path]:
    """``path`` itself if it holds run folders, else its (non-hidden) sub-folders that do."""

    def has_runs(p: Path) -> bool:
        return any(
            (c / "status.json").exists() or (c / "spec.yaml").exists()
            for c in p.iterdir()
            if c.is_dir() and not c.name.startswith(".")
        )

    if not path.is_dir():
        return []
    if has_runs(path):
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and has_runs(p))


def status_rows(grid_dir: Path) -> list[dict]:
    """One row per run folder of a grid folder, read from the records alone (no grid file needed)."""
    rows = []
    for run_dir in sorted(p for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not ((run_dir / "status.json").exists() or (run_dir / "spec.yaml").exists()):
            continue
        st = inspect(run_dir)
        try:
            spec = records.read_spec(run_dir) or {}
        except records.CorruptRecordError as err:
            spec, st = {}, {**st, "state": "corrupt", "corrupt": st["corrupt"] or str(err)}
            st["why"] = verdict_text(st)
        rows.append(
            {
                "run_id": run_dir.name,
                "label": spec.get("label", "?"),
                "seed": spec.get("seed", "?"),
                "state": st["state"],
                "attempts": st["attempts"],
                "reason": _reason(st) or _resumed(run_dir, st),
            }
        )
    return rows
