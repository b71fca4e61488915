"""Re-derive one paired interval of a report by hand, from the per-example files alone.

    python scripts/rederive_paired.py RESULTS/GRID ROUTER [BASELINE] [TASK]

Reads every done run's eval_items.npz and final.json under RESULTS/GRID (no moebench imports), pairs
ROUTER with BASELINE (default softmax-topk) seed by seed, and prints: the mean difference (which must
equal the report's Δ exactly), a normal-theory 95% interval from the textbook standard error, and an
independent percentile bootstrap (index resampling, not the report's multinomial-weight code). Compare
with the row of <report>/paired.csv that it prints last."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np


def items_by_seed(grid: Path, label: str, task: str | None = None) -> dict[int, np.ndarray]:
    out = {}
    for run in sorted(grid.iterdir()):
        final = run / "final.json"
        if not final.is_file() or not (run / "eval_items.npz").is_file():
            continue
        rec = json.loads(final.read_text())
        if rec.get("label") == label and (task is None or rec.get("task") == task):
            with np.load(run / "eval_items.npz", allow_pickle=False) as z:
                out[int(rec["seed"])] = z["headline"].astype(float)
            assert abs(out[int(rec["seed"])].mean() - rec["headline"]["value"]) < 1e-6, run  # items = headline
    return out


def main(grid: str, router: str, baseline: str = "softmax-topk", task: str | None = None) -> None:
    """``task``: which task's runs, for a grid of several (each task has its own eval set)."""
    g = Path(grid)
    a, b = items_by_seed(g, router, task), items_by_seed(g, baseline, task)
    seeds = sorted(set(a) & set(b))
    d = np.vstack([a[s] - b[s] for s in seeds])  # seeds x items, paired by item index
    s, n = d.shape
    mean = d.mean()
    print(f"{router} - {baseline}: {s} seed(s) {seeds} x {n} eval items")
    print(f"  mean difference            {mean:+.6f}")
    # textbook SE of a mean of per-item differences (averaged over seeds first), plus seed spread if s > 1
    per_item = d.mean(0)
    se_items = per_item.std(ddof=1) / np.sqrt(n)
    se_seeds = d.mean(1).std(ddof=1) / np.sqrt(s) if s > 1 else 0.0
    se = float(np.hypot(se_items, se_seeds))
    print(f"  SE (items, seeds, total)   {se_items:.6f}, {se_seeds:.6f}, {se:.6f}")
    print(f"  normal 95% CI              [{mean - 1.96 * se:+.6f}, {mean + 1.96 * se:+.6f}]")
    rng = np.random.default_rng(12345)
    boot = np.empty(4000)
    for i in range(boot.size):  # resample seeds, then the same items for all
        rows = rng.integers(0, s, s)
        cols = rng.integers(0, n, n)
        boot[i] = d[np.ix_(rows, cols)].mean()
    lo, hi = np.quantile(boot, [0.025, 0.975])
    print(f"  bootstrap 95% CI (by hand) [{lo:+.6f}, {hi:+.6f}]   (4000 index resamples)")
    paired = g / "report" / "paired.csv"
    if paired.is_file():
        for row in csv.DictReader(paired.open()):
            if row["label"] == router and (task is None or row.get("bench", task) == task):
                print(
                    f"  report paired.csv          diff {float(row['diff_mean']):+.6f}  CI [{float(row['ci_low']):+.6f}, "
                    f"{float(row['ci_high']):+.6f}]  p {float(row['p_value']):.3f}  p(Holm) {float(row['p_holm']):.3f}  "
                    f"{row['method']}  {row['verdict']}"
                )


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    main(*sys.argv[1:])
