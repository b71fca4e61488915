"""Per-example evaluation outputs (each run's ``eval_items.npz``) for the report's bootstrap.

Results folders are untrusted: a missing file leaves the run without items (the report falls back
to seed-level statistics and says so), an unreadable or inconsistent one becomes a listed problem."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from moebench.training.records import EVAL_ITEMS_FILE, CorruptRecordError, read_eval_items


def load_headline_items(runs: pd.DataFrame, problems: list[str]) -> dict[str, np.ndarray]:
    """run_id -> the per-eval-item ``headline`` array of every done run that has a readable one whose
    mean equals the run's headline value (else it is reported and skipped: it would not be the number
    the leaderboard shows)."""
    out: dict[str, np.ndarray] = {}
    if runs.empty or "run_dir" not in runs:
        return out
    for _, r in runs[runs["state"] == "done"].iterrows():
        if not isinstance(r["run_dir"], str):
            continue
        path = Path(r["run_dir"]) / EVAL_ITEMS_FILE
        try:
            items = read_eval_items(path)
        except CorruptRecordError as err:
            problems.append(str(err))
            continue
        if not items or "headline" not in items:
            continue
        h = np.asarray(items["headline"], dtype=np.float64).reshape(-1)
        value = r["headline_value"]
        if h.size == 0 or not np.isfinite(h).all():
            problems.append(f"{path}: the headline items are empty or not finite; skipped")
            continue
        if not (isinstance(value, float) and math.isnan(value)) and not math.isclose(
            float(h.mean()), float(value), rel_tol=1e-4, abs_tol=1e-6
        ):
            problems.append(
                f"{path}: the mean of its headline items ({h.mean():.6g}) differs from final.json's "
                f"headline ({value:.6g}); skipped (rerun the run)"
            )
            continue
        out[str(r["run_id"])] = h
    return out


def seed_matrix(runs: pd.DataFrame, items: dict[str, np.ndarray], seeds=None) -> tuple[list, np.ndarray | None]:
    """(seeds, seeds x items matrix) of the done runs in ``runs`` (one group) that have items, one row
    per seed (a seed's duplicates averaged), restricted to ``seeds`` when given. None when fewer than
    one seed has items or their eval sets differ in size."""
    rows: dict = {}
    for _, r in runs[runs["state"] == "done"].iterrows():
        h = items.get(str(r["run_id"]))
        if h is None or (seeds is not None and r["seed"] not in seeds):
            continue
        rows.setdefault(r["seed"], []).append(h)
    if not rows or len({a.size for v in rows.values() for a in v}) != 1:
        return [], None
    order = sorted(rows)
    return order, np.vstack([np.mean(rows[s], axis=0) for s in order])
