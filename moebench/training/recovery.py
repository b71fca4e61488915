"""Structure-recovery metrics: how well the dispatched top-1 experts recover a task's true groups.

All read one contingency matrix C (groups x experts, with the "unrouted" tokens as one more column,
so a token sent nowhere is its own category), counted over held-out tokens that have a group. They
equal scikit-learn's label-based functions on the same pairs (``tests/test_recovery.py`` checks it) but
work on counts, so an evaluation never expands millions of tokens into label arrays:

- ``h_group_given_expert``: H(group | expert), nats; 0 = every expert is pure (one group each).
- ``h_expert_given_group``: H(expert | group), nats; 0 = every group goes to one expert.
- ``nmi``: I(group; expert) / mean(H(group), H(expert)) (sklearn's default, arithmetic normaliser).
- ``ari``: adjusted Rand index over token pairs (Hubert & Arabie 1985), 0 = chance, 1 = same partition.
- ``routing_accuracy``: with as many experts as groups, the share of tokens on their group's expert
  under the best one-to-one expert-group map (Hungarian, scipy); None otherwise.
"""

from __future__ import annotations

import numpy as np

RECOVERY_METRICS = ("nmi", "ari", "h_group_given_expert", "h_expert_given_group", "routing_accuracy")


def best_assignment(score, maximize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the optimal one-to-one assignment of a (K, E) score matrix, K <= E (Hungarian,
    ``scipy.optimize.linear_sum_assignment``). Small tables (E <= 7: at most 5,040 candidates) are solved
    exhaustively in numpy: importing scipy.optimize costs ~1-1.5 s of CPU per process, more than a
    structure run's evaluation."""
    c = np.asarray(score, dtype=np.float64)
    k, e = c.shape
    if k <= e <= 7:
        from itertools import permutations

        perms = np.array(list(permutations(range(e), k)), dtype=np.int64).reshape(-1, k)
        totals = c[np.arange(k), perms].sum(1)
        best = perms[int(np.argmax(totals) if maximize else np.argmin(totals))]
        return np.arange(k), best
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(c, maximize=maximize)


def _table(contingency) -> np.ndarray:
    c = np.asarray(contingency, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"a contingency matrix is 2-D (groups x experts), got shape {c.shape}")
    if (c < 0).any():
        raise ValueError("a contingency matrix holds counts >= 0")
    return c


def _h(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _parts(c: np.ndarray) -> tuple[float, float, float]:
    """H(group), H(expert), H(group, expert) of the normalised table."""
    p = c / c.sum()
    return _h(p.sum(1)), _h(p.sum(0)), _h(p.reshape(-1))


def h_group_given_expert(contingency) -> float | None:
    c = _table(contingency)
    if c.sum() == 0:
        return None
    _, he, hge = _parts(c)
    return max(hge - he, 0.0)


def h_expert_given_group(contingency) -> float | None:
    c = _table(contingency)
    if c.sum() == 0:
        return None
    hg, _, hge = _parts(c)
    return max(hge - hg, 0.0)


def nmi(contingency) -> float | None:
    """sklearn's normalized_mutual_info_score (arithmetic): 1 when both sides are one category."""
    c = _table(contingency)
    if c.sum() == 0:
        return None
    hg, he, hge = _parts(c)
    if hg == 0 and he == 0:
        return 1.0
    mi = max(hg + he - hge, 0.0)
    return float(min(mi / max((hg + he) / 2, np.finfo(float).eps), 1.0))


def ari(contingency) -> float | None:
    """sklearn's adjusted_rand_score, from the pair confusion matrix of the table."""
    c = _table(contingency)
    n = c.sum()
    if n == 0:
        return None
    sum_sq = (c**2).sum()
    rows, cols = c.sum(1), c.sum(0)
    tp = sum_sq - n
    fp = (cols**2).sum() - sum_sq
    fn = (rows**2).sum() - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return float(2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn)))


def routing_accuracy(contingency, num_experts: int | None = None) -> float | None:
    """Hungarian-matched accuracy when the groups number the experts (the first ``num_experts``
    columns; any further column, "unrouted", always counts as wrong); None when they differ."""
    c = _table(contingency)
    e = c.shape[1] if num_experts is None else num_experts
    if c.sum() == 0 or c.shape[0] != e:
        return None
    rows, cols = best_assignment(c[:, :e])
    return float(c[rows, cols].sum() / c.sum())


def recovery(contingency, num_experts: int | None = None) -> dict:
    """Every metric of `RECOVERY_METRICS` for one table (None where undefined or empty)."""
    c = _table(contingency)
    c = c[c.sum(1) > 0] if c.sum() else c  # groups absent from the eval tokens carry no information
    return {
        "nmi": nmi(c),
        "ari": ari(c),
        "h_group_given_expert": h_group_given_expert(c),
        "h_expert_given_group": h_expert_given_group(c),
        "routing_accuracy": routing_accuracy(contingency, num_experts) if c.size else None,
    }


def mean_recovery_by_role(per_layer: list[dict]) -> dict:
    """``recovery_by_role[role][metric]`` averaged over the layers that define it."""
    out: dict = {}
    for d in per_layer:
        for role, metrics in (d.get("recovery_by_role") or {}).items():
            for k, v in metrics.items():
                if v is not None:
                    out.setdefault(role, {}).setdefault(k, []).append(v)
    return {role: {k: float(np.mean(v)) for k, v in m.items()} for role, m in out.items()}


def principal_angles(router_bases, true_bases) -> dict | None:
    """Principal angles (degrees) between each expert's routing basis and its matched true subspace.

    ``router_bases``: E arrays (d, r_e); ``true_bases``: K arrays (d, r), all in the same space (columns
    need not be orthonormal: the spans are compared, scipy.linalg.subspace_angles). Experts are matched
    one-to-one to subspaces (Hungarian, scipy) on the mean cosine of their principal angles; with E > K
    only K experts are matched. Returns ``principal_angle_mean_deg`` (mean over the matched pairs of each
    pair's mean angle), ``principal_angles_deg`` (per true subspace: its expert's min(r_e, r) angles,
    smallest first), ``principal_angle_match`` (per true subspace: its expert); None without bases.
    0 degrees: the true subspace lies inside its expert's routing basis; 90: orthogonal to it."""
    if not len(router_bases) or not len(true_bases):
        return None
    from scipy.linalg import subspace_angles

    angles = [[np.sort(subspace_angles(np.asarray(b), np.asarray(u))) for b in router_bases] for u in true_bases]
    cos = np.array([[float(np.cos(a).mean()) for a in row] for row in angles])  # (K, E)
    if cos.shape[0] > cos.shape[1]:  # more subspaces than experts: match each expert to one subspace
        cols_t, rows_t = best_assignment(cos.T)
        order = np.argsort(rows_t)
        rows, cols = rows_t[order], cols_t[order]
    else:
        rows, cols = best_assignment(cos)
    per = [np.degrees(angles[k][e]) for k, e in zip(rows, cols, strict=True)]
    return {
        "principal_angle_mean_deg": float(np.mean([a.mean() for a in per])),
        "principal_angles_deg": [[round(float(x), 3) for x in a] for a in per],
        "principal_angle_match": [int(e) for e in cols],
    }


def group_subspaces(sums, outer, counts, rank: int) -> list[np.ndarray]:
    """Each group's top-``rank`` principal subspace (d, rank) of its tokens, from accumulated sums:
    ``sums`` (K, d), ``outer`` (K, d, d) = sum of x x^T, ``counts`` (K,). Centred (each group's own
    mean removed: an offset shared by every token, e.g. a LayerNorm bias, is not a direction of the
    group). Groups with fewer than rank + 1 tokens are skipped."""
    out = []
    for s, o, n in zip(np.asarray(sums), np.asarray(outer), np.asarray(counts), strict=True):
        if n <= rank:
            continue
        mean = s / n
        cov = o / n - np.outer(mean, mean)
        w, v = np.linalg.eigh(cov)
        out.append(v[:, np.argsort(w)[::-1][:rank]])
    return out
