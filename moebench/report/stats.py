"""Small statistics for the report: Student-t quantiles and the paired difference with its confidence
interval. Written out here (regularised incomplete beta + bisection) so the report needs no scipy."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p, by bisection on ``t_cdf``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Paired:
    """Mean of a - b over matched seeds with a two-sided t confidence interval (NaN when n < 2)."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    p_value: float


def paired_difference(a, b, level: float = 0.95) -> Paired:
    """Paired t analysis of ``a - b`` (same seeds, same order). Sample std uses ddof=1."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n == 0:
        nan = float("nan")
        return Paired(0, nan, nan, nan, nan, nan)
    mean = float(d.mean())
    if n < 2:
        nan = float("nan")
        return Paired(n, mean, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        return Paired(n, mean, 0.0, mean, mean, 1.0 if mean == 0 else 0.0)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    p = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
    return Paired(n, mean, sd, mean - half, mean + half, p)


# ----------------------------------------------------------------------------------------------------
# bootstrap over eval examples and seeds (the per-example outputs of each run's eval_items.npz)


@dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: the observed mean, its percentile interval, the bootstrap standard
    deviation (the standard error of the mean) and, for a difference, the two-sided p value of 0."""

    n_seeds: int
    n_items: int
    mean: float
    ci_low: float
    ci_high: float
    se: float
    p_value: float = float("nan")


def _resampled_means(d: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``d`` (seeds x items) under ``n_boot`` two-level resamples: seeds with replacement
    and, independently, eval items with replacement (the same items for every seed, since every seed
    evaluates the same eval set). Multinomial weights instead of index arrays keep it one matmul."""
    s, n = d.shape
    item_w, seed_w = _resample_weights(s, n, n_boot, seed)
    per_seed = item_w @ d.T / n  # (B, S)
    return (per_seed * seed_w).sum(1) / s


@functools.lru_cache(maxsize=8)
def _resample_weights(s: int, n: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The resample weights depend only on the shape and the seed, not on the data, so a report's
    hundreds of comparisons of the same shape share one draw (drawing (B, N) multinomial weights
    took ~0.7 s each time; the numbers are the same, drawn once). Read-only: they are shared."""
    rng = np.random.default_rng(seed)
    item_w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # (B, N)
    seed_w = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)  # (B, S)
    item_w.flags.writeable = False
    seed_w.flags.writeable = False
    return item_w, seed_w


def _as_matrix(x, name: str) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"{name} must be a non-empty (seeds x items) array, got shape {m.shape}")
    return m


def bootstrap_mean(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean over seeds and eval items of ``values`` (seeds x items) with a percentile bootstrap CI."""
    d = _as_matrix(values, "values")
    boot = _resampled_means(d, n_boot, seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Interval(d.shape[0], d.shape[1], float(d.mean()), float(lo), float(hi), float(boot.std(ddof=1)))


def paired_bootstrap(a, b, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``a - b`` (both seeds x items, rows = the same seeds, columns = the same eval items)
    with a percentile bootstrap CI, resampling seeds and items jointly for both (paired), and the
    two-sided bootstrap p value of "no difference": 2 x the share of resampled means on the far side
    of 0, with the +1 correction so it is never 0."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap needs matching (seeds x items) arrays, got {a.shape} and {b.shape}")
    d = a - b
    boot = _resampled_means(d, n_boot, seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    below, above = int((boot <= 0).sum()), int((boot >= 0).sum())
    p = min(1.0, 2.0 * (min(below, above) + 1) / (n_boot + 1))
    return Interval(d.shape[0], d.shape[1], float(d.mean()), float(lo), float(hi), float(boot.std(ddof=1)), p)


def paired_bootstrap_means(a, b, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """The resampled means of ``a - b`` behind ``paired_bootstrap`` (same seed: the same resamples),
    for tests that need the whole distribution (TOST)."""
    return _resampled_means(_as_matrix(a, "a") - _as_matrix(b, "b"), n_boot, seed)


def holm(p_values) -> list[float]:
    """Holm-Bonferroni adjusted p values, in the input order: sort ascending, multiply the i-th
    smallest (0-based) by m - i, carry the running maximum, cap at 1. NaN entries stay NaN and do not
    count towards m."""
    p = [float(x) for x in p_values]
    idx = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: p[i])
    m = len(idx)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def rank_groups(entries, higher_is_better: bool = True) -> dict[str, int]:
    """Group 1 = the best mean and every entry whose interval overlaps the best's; then the best of
    the rest starts group 2, and so on. ``entries``: (name, mean, ci_low, ci_high); an entry with no
    interval gets no group."""
    pool = [e for e in entries if not any(math.isnan(float(v)) for v in e[1:4])]
    pool.sort(key=lambda e: e[1], reverse=higher_is_better)
    groups: dict[str, int] = {}
    group = 0
    while pool:
        group += 1
        _, _, lo, hi = pool[0]
        members = [e for e in pool if e[2] <= hi and e[3] >= lo]
        for e in members:
            groups[e[0]] = group
        pool = [e for e in pool if e[0] not in groups]
    return groups


def minimum_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true difference a two-sided test at ``alpha`` detects with probability ``power`` when
    the difference's standard error is ``se``: (z_{1-alpha/2} + z_power) * se (2.80 se by default)."""
    from statistics import NormalDist

    z = NormalDist()
    return (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * float(se)
