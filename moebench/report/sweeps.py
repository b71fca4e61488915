"""Sweeps over a task's data (``task_args.*``, e.g. the structure track's four generators) are tasks of
their own in every cross-task view (ranks, normalised scores, plots): each has its own headline scale,
so ranking or averaging across its points would mix numbers that do not compare."""

from __future__ import annotations

import pandas as pd


def task_sweeps_as_tasks(frame: pd.DataFrame) -> pd.DataFrame:
    """A sweep point that changes only the task's data (``task_args.*``, e.g. the structure track's four
    generators) is a task of its own, with its own headline scale: it becomes part of ``bench`` and
    leaves the router's ``variant`` empty, so Borda points and normalised scores never mix its points."""
    if frame.empty or "variant" not in frame:
        return frame
    variant = frame["variant"].fillna("").astype(str)
    is_task = _data_sweeps(frame)
    if not is_task.any():
        return frame
    out = frame.copy()
    values = variant[is_task].map(lambda v: ", ".join(p.split("=", 1)[-1] for p in v.split(", ")))  # short headers
    out.loc[is_task, "bench"] = out.loc[is_task, "bench"].astype(str) + ": " + values
    out.loc[is_task, "variant"] = ""
    return out


def _data_sweeps(frame: pd.DataFrame) -> pd.Series:
    """Rows whose sweep point changes only the task's data (every part of ``variant`` is ``task_args.*``)."""
    variant = frame["variant"].fillna("").astype(str)
    return variant.map(lambda v: bool(v) and all(p.strip().startswith("task_args.") for p in v.split(", ")))


def without_data_sweep_variant(frame: pd.DataFrame) -> pd.DataFrame:
    """The per-layer / per-evaluation frames' side of `task_sweeps_as_tasks` (they carry no ``bench``): a
    data-sweep row's ``variant`` is emptied, since its task already says which data it is."""
    if frame.empty or "variant" not in frame:
        return frame
    out = frame.copy()
    out.loc[_data_sweeps(frame), "variant"] = ""
    return out
