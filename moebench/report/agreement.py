"""Cross-seed routing agreement: is a router's routing a property of the data or of the seed?

Expert indices are arbitrary across seeds (expert 3 of seed 0 may be expert 5 of seed 1), so two
seeds' top-1 assignments of the same fixed probe tokens (each run's ``probe_top1.npz``) are compared
after matching expert indices by the Hungarian method on their co-assignment counts (Tencent
YOLO-Master PR #216): agreement = the share of probe tokens whose matched top-1 expert is the same
(unrouted in both counts as agreeing; unrouted in one only as not). The load distributions (final.json
``counts``) are compared under the same matching by their Jensen-Shannon divergence (base 2, in
[0, 1]). Per run: the mean over its pairs with the other seeds of its (task, router label, sweep point);
the mean over a group's runs is then exactly the mean over its seed pairs.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import jensenshannon

from moebench.training.records import PROBE_TOP1_FILE, CorruptRecordError, read_probe_top1

COLUMNS = ("seed_agreement", "seed_load_jsd")


def match_experts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``perm`` with ``perm[i]`` = the expert of ``b`` matched to expert i of ``a``: the one-to-one map that
    maximises the probe tokens both send to matched experts (Hungarian method; unrouted tokens ignored)."""
    n = int(max(a.max(initial=-1), b.max(initial=-1))) + 1
    both = (a >= 0) & (b >= 0)
    co = np.zeros((n, n), dtype=np.int64)
    np.add.at(co, (a[both], b[both]), 1)
    rows, cols = linear_sum_assignment(co, maximize=True)
    perm = np.arange(n)
    perm[rows] = cols
    return perm


def top1_agreement(a, b) -> float | None:
    """Share of probe tokens whose top-1 expert agrees after matching (None for no tokens)."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"top-1 vectors of different length: {a.shape} and {b.shape}")
    if a.size == 0:
        return None
    perm = match_experts(a, b)
    if perm.size == 0:  # no token routed in either seed
        return float((a == b).mean())
    mapped = np.where(a >= 0, perm[np.clip(a, 0, None)], -1)
    return float((mapped == b).mean())


def load_jsd(counts_a, counts_b, perm: np.ndarray) -> float | None:
    """Jensen-Shannon divergence (base 2) between two load distributions, ``counts_a`` re-indexed by the
    matching ``perm`` (experts the probe never saw keep their own index)."""
    ca, cb = np.asarray(counts_a, dtype=np.float64), np.asarray(counts_b, dtype=np.float64)
    if ca.shape != cb.shape or ca.ndim != 1 or perm.size > ca.size or ca.sum() <= 0 or cb.sum() <= 0:
        return None
    full = np.arange(ca.size)
    full[: perm.size] = perm  # a permutation of 0..n-1 within 0..E-1: still a permutation
    aligned = np.zeros_like(ca)
    aligned[full] = ca
    return float(jensenshannon(aligned, cb, base=2) ** 2)  # scipy returns the distance, the divergence's root


def pair(a: tuple, b: tuple) -> tuple[list[float | None], list[float | None]]:
    """Per layer (agreement, load JSD) of two runs' (top-1 per layer, counts per layer)."""
    agree: list[float | None] = []
    jsd: list[float | None] = []
    for ta, tb, ca, cb in zip(a[0], b[0], a[1], b[1]):
        if ta.shape != tb.shape or ta.size == 0:
            agree.append(None)
            jsd.append(None)
            continue
        agree.append(top1_agreement(ta, tb))
        jsd.append(load_jsd(ca, cb, match_experts(ta, tb)) if ca is not None and cb is not None else None)
    return agree, jsd


def add_seed_agreement(runs: pd.DataFrame, layers: pd.DataFrame, problems: list[str]) -> None:
    """Add ``seed_agreement``, ``seed_load_jsd`` and their ``.layer<i>`` columns to ``runs`` (done runs
    with a readable probe_top1.npz and at least one other such seed in their group); a damaged file is
    treated as absent, with its reason in ``problems``."""
    if runs.empty:
        return
    done = runs[(runs["state"] == "done") & runs["run_dir"].notna() & runs["bench"].notna()]
    values: dict[str, dict[str, float]] = {}
    for _, g in done.groupby(["bench", "label", "variant"], sort=False):
        loaded = {}
        for idx, r in g.iterrows():
            data = _load(r, layers, problems)
            if data is not None:
                loaded[idx] = data
        if len(loaded) < 2:
            continue
        for (k, col), vals in _group_sums(g, loaded, problems).items():
            values.setdefault(col, {})[k] = float(np.mean(vals))
    for col in sorted(values, key=_layer_key):
        runs[col] = pd.Series(values[col], dtype=float).reindex(runs.index)
    for name in COLUMNS:
        cols = [c for c in runs.columns if c.startswith(f"{name}.layer")]
        runs[name] = runs[cols].mean(axis=1, skipna=True) if cols else math.nan


def _group_sums(g: pd.DataFrame, loaded: dict, problems: list[str]) -> dict:
    """(run index, column) -> the values of that run against every other seed of its group."""
    sums: dict = {}
    for i, j in combinations(sorted(loaded), 2):
        if loaded[i][2] != loaded[j][2]:
            problems.append(
                f"{g.loc[i, 'run_dir']} and {g.loc[j, 'run_dir']}: probe_top1.npz layers differ "
                f"({loaded[i][2]} vs {loaded[j][2]}); no cross-seed agreement for this pair"
            )
            continue
        agree, jsd = pair(loaded[i], loaded[j])
        for k in (i, j):
            for name, per_layer in (("seed_agreement", agree), ("seed_load_jsd", jsd)):
                for li, v in enumerate(per_layer):
                    if v is not None:
                        sums.setdefault((k, f"{name}.layer{li}"), []).append(v)
    return sums


def _layer_key(col: str):
    name, _, i = col.partition(".layer")
    return name, int(i)


def _load(r, layers: pd.DataFrame, problems: list[str]):
    """(top-1 arrays, counts per layer or None, layer names) of one run, or None (absent / damaged)."""
    path = Path(r["run_dir"]) / PROBE_TOP1_FILE
    try:
        got = read_probe_top1(path)
    except CorruptRecordError as err:
        problems.append(f"{err}; treated as absent (no cross-seed agreement for this run)")
        return None
    if got is None:
        return None
    names, top1 = got
    mine = layers[layers["run_id"] == r["run_id"]].sort_values("layer_idx") if "run_id" in layers else layers.iloc[:0]
    counts = list(mine["counts"]) if "counts" in mine and len(mine) == len(names) else [None] * len(names)
    counts = [c if isinstance(c, list) else None for c in counts]
    return top1, counts, names
