"""Equivalence and probability of improvement for the paired comparison.

"n.s." only says a difference was not shown; TOST (two one-sided tests, Schuirmann 1987) says whether
the data rule out every difference larger than the task's margin δ. P(improve) is rliable's
probability of improvement (Agarwal et al. 2021): the chance that a run of the router beats a run of
the reference, with a bootstrap interval over runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass(frozen=True)
class Tost:
    """p of each one-sided test (H0: Δ <= -δ, H0: Δ >= +δ), their max (the TOST p), and the verdict."""

    p_lower: float
    p_upper: float
    p: float
    equivalent: bool


def tost_t(mean: float, se: float, df: float, margin: float, alpha: float = ALPHA) -> Tost:
    """TOST on a t-distributed difference: t1 = (Δ + δ) / se against the upper tail, t2 = (Δ − δ) / se
    against the lower; equivalent when both p < alpha (the 1 − 2α interval lies inside ±δ)."""
    if not (margin > 0 and se >= 0 and df > 0) or any(map(math.isnan, (mean, se, df, margin))):
        return Tost(math.nan, math.nan, math.nan, False)
    if se == 0:
        inside = abs(mean) < margin
        p1, p2 = (0.0 if mean > -margin else 1.0), (0.0 if mean < margin else 1.0)
        return Tost(p1, p2, max(p1, p2), inside)
    p1 = float(stats.t.sf((mean + margin) / se, df))
    p2 = float(stats.t.cdf((mean - margin) / se, df))
    return Tost(p1, p2, max(p1, p2), max(p1, p2) < alpha)


def tost_bootstrap(boot, margin: float, alpha: float = ALPHA) -> Tost:
    """TOST on bootstrap means of the difference: each one-sided p is the share of resampled means on
    the null's side of ±δ (with the +1 correction, so never 0)."""
    boot = np.asarray(boot, dtype=float)
    if not margin > 0 or boot.size == 0:
        return Tost(math.nan, math.nan, math.nan, False)
    n = boot.size
    p1 = (int((boot <= -margin).sum()) + 1) / (n + 1)
    p2 = (int((boot >= margin).sum()) + 1) / (n + 1)
    return Tost(p1, p2, max(p1, p2), max(p1, p2) < alpha)


def p_improve(x, y, higher_is_better: bool = True) -> float:
    """P(X > Y) over all pairs of runs, ties counting one half (Mann-Whitney U / (n m)); "better" follows
    the metric's direction, so for an error metric it is P(X < Y)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size == 0 or y.size == 0:
        return math.nan
    if not higher_is_better:
        x, y = -x, -y
    u = stats.mannwhitneyu(x, y, alternative="two-sided").statistic
    return float(u) / (x.size * y.size)


def p_improve_interval(
    x, y, higher_is_better: bool = True, level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(P(improve), low, high): percentile bootstrap resampling the runs of each side independently."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    est = p_improve(x, y, higher_is_better)
    if math.isnan(est):
        return est, math.nan, math.nan
    rng = np.random.default_rng(seed)
    xs = x[rng.integers(0, x.size, size=(n_boot, x.size))]
    ys = y[rng.integers(0, y.size, size=(n_boot, y.size))]
    sign = 1.0 if higher_is_better else -1.0
    d = sign * (xs[:, :, None] - ys[:, None, :])  # (B, n, m)
    boot = (d > 0).mean((1, 2)) + 0.5 * (d == 0).mean((1, 2))
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return est, float(lo), float(hi)
