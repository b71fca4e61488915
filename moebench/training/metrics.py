"""The suite's shared metric definitions (their one home: the README's "Results" section points here), as
pure functions on tensors / arrays, plus `RoutingStatsAccumulator`, which collects them per MoE layer
over an evaluation pass.

Every report, plot and test reads these names, so a number called ``load_cv`` means the same thing in
every run. Inputs may be torch tensors, numpy arrays or lists; outputs are Python floats (or None
where a quantity is undefined, e.g. a gate entropy for a router that reports no scores).

Conventions: c (E,) tokens counted per expert (all routed pairs, after capacity drops); scores (T, E)
the router's per-token probabilities or scores, turned into a distribution by clamping at 0 and
dividing by the row sum (a row summing to 0 counts as uniform); entropies in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from moebench.training.recovery import (
    RECOVERY_METRICS,
    group_subspaces,
    mean_recovery_by_role,
    principal_angles,
    recovery,
)

# ----------------------------------------------------------------------------------------------------
# helpers


def _np(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _counts(counts) -> np.ndarray:
    c = _np(counts).astype(np.float64).reshape(-1)
    if c.size == 0:
        raise ValueError("counts must have one entry per expert, got an empty array")
    if (c < 0).any():
        raise ValueError(f"counts must be >= 0, got {c.tolist()}")
    return c


def normalize_scores(scores) -> np.ndarray:
    """Per-token distribution p = max(s, 0) / sum_j max(s_j, 0); a row summing to 0 becomes uniform."""
    s = np.clip(_np(scores).astype(np.float64), 0.0, None)
    if s.ndim != 2:
        raise ValueError(f"scores must have shape (tokens, experts), got {s.shape}")
    total = s.sum(1, keepdims=True)
    uniform = np.full_like(s, 1.0 / max(s.shape[1], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(total > 0, s / np.where(total > 0, total, 1.0), uniform)
    return p


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    """H(p) = -sum p log p (nats), with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=axis)


# ----------------------------------------------------------------------------------------------------
# load balance, from counts c (E,)


def load_cv(counts) -> float | None:
    """Coefficient of variation std(c) / mean(c), population std (ddof 0). 0 = perfectly balanced.
    None when no token was routed."""
    c = _counts(counts)
    m = c.mean()
    return None if m == 0 else float(c.std() / m)


def max_mean_load(counts) -> float | None:
    """max(c) / mean(c): how much busier the busiest expert is than average (1 = balanced, E = all
    tokens on one expert)."""
    c = _counts(counts)
    m = c.mean()
    return None if m == 0 else float(c.max() / m)


def norm_entropy(counts) -> float | None:
    """H(c / sum c) / log E in [0, 1]: 1 = uniform load, 0 = one expert takes everything. 1 for E = 1."""
    c = _counts(counts)
    if c.sum() == 0:
        return None
    if c.size == 1:
        return 1.0
    return float(_entropy(c / c.sum()) / math.log(c.size))


def gini(counts) -> float | None:
    """Gini coefficient of the load, sum_i sum_j |c_i - c_j| / (2 E^2 mean(c)): 0 = equal,
    (E - 1) / E = one expert takes everything."""
    c = _counts(counts)
    n, m = c.size, c.mean()
    if m == 0:
        return None
    return float(np.abs(c[:, None] - c[None, :]).sum() / (2.0 * n * n * m))


def dead_experts(counts) -> int:
    """Number of experts that received no token (c_i == 0)."""
    return int((_counts(counts) == 0).sum())


def near_dead_experts(counts, share_of_uniform: float = 0.01) -> int:
    """Experts receiving less than ``share_of_uniform`` (1 %) of the uniform share 1/E of the routed
    pairs: alive on paper, useless in practice. Counts dead experts too."""
    c = _counts(counts)
    total = c.sum()
    if total == 0:
        return int(c.size)
    return int((c / total < share_of_uniform / c.size).sum())


def max_violation(counts) -> float | None:
    """MaxVio (Wang et al. 2024): max(c) / mean(c) - 1; 0 = perfectly balanced."""
    m = max_mean_load(counts)
    return None if m is None else m - 1.0


def load_share_range(counts) -> tuple[float, float] | None:
    """(min, max) share of routed pairs over experts, each in [0, 1] (uniform = 1/E both)."""
    c = _counts(counts)
    total = c.sum()
    return None if total == 0 else (float(c.min() / total), float(c.max() / total))


def drop_rate(dropped: int, pairs: int) -> float | None:
    """dropped / (pairs + dropped): share of (token, expert) assignments removed by the capacity limit;
    ``pairs`` counts the assignments kept."""
    total = dropped + pairs
    return None if total == 0 else float(dropped / total)


def switch_balance(top1, scores, num_experts: int | None = None) -> float | None:
    """Switch balance term E * sum_i f_i P_i (Fedus et al. 2021), unweighted so uniform routing = 1.
    f_i: share of tokens whose top-1 expert is i; P_i: mean over tokens of the normalised score of i.
    Equals 1 when f or P is uniform and grows towards E as routing concentrates on one expert."""
    p = normalize_scores(scores)
    e = p.shape[1] if num_experts is None else num_experts
    t = _np(top1).reshape(-1)
    if t.size == 0:
        return None
    f = np.bincount(t.astype(np.int64), minlength=e)[:e] / t.size
    return float(e * (f * p.mean(0)).sum())


def switch_balance_from_sums(top1_counts, score_sums, num_tokens: int) -> float | None:
    """The same E * sum f_i P_i from accumulated sums: top-1 counts (E,) and summed normalised
    scores (E,) over ``num_tokens`` tokens (what the accumulator keeps across batches)."""
    if num_tokens == 0:
        return None
    f = _np(top1_counts).astype(np.float64) / num_tokens
    pm = _np(score_sums).astype(np.float64) / num_tokens
    return float(f.size * (f * pm).sum())


# ----------------------------------------------------------------------------------------------------
# router


def gate_entropy(scores) -> float | None:
    """Mean over tokens of H(p_t) in nats, p_t the normalised scores of token t (log E = undecided,
    0 = all weight on one expert)."""
    p = normalize_scores(scores)
    return None if p.shape[0] == 0 else float(_entropy(p).mean())


def top1_margin(scores) -> float | None:
    """Mean over tokens of p_(1) - p_(2), the gap between the two largest normalised scores
    (1 for a single expert)."""
    p = normalize_scores(scores)
    if p.shape[0] == 0:
        return None
    if p.shape[1] == 1:
        return 1.0
    top2 = -np.sort(-p, axis=1)[:, :2]
    return float((top2[:, 0] - top2[:, 1]).mean())


def fallback_rate(fallback_tokens: float, tokens: int) -> float | None:
    """Share of tokens for which a thresholded router (ERMoE) had to fill its k experts below the
    threshold."""
    return None if tokens == 0 else float(fallback_tokens / tokens)


def unrouted_rate(unrouted_tokens: int, tokens: int) -> float | None:
    """Share of tokens routed to no expert at all (expert-choice; or every pair dropped)."""
    return None if tokens == 0 else float(unrouted_tokens / tokens)


# ----------------------------------------------------------------------------------------------------
# stability (on the fixed probe batch)


def switch_rate(prev_top1, cur_top1) -> float | None:
    """Share of probe tokens whose top-1 expert differs between two evaluations; None without a
    previous one."""
    if prev_top1 is None or cur_top1 is None:
        return None
    a, b = _np(prev_top1).reshape(-1), _np(cur_top1).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"switch_rate needs top-1 vectors of equal length, got {a.shape} and {b.shape}")
    return None if a.size == 0 else float((a != b).mean())


def final_switch(history: Sequence) -> list[float]:
    """StableMoE's fluctuation measure: for each evaluation i, the share of probe tokens whose top-1
    expert at i differs from the final one (the last entry, which is therefore 0)."""
    if len(history) == 0:
        return []
    final = _np(history[-1]).reshape(-1)
    out = []
    for h in history:
        h = _np(h).reshape(-1)
        if h.shape != final.shape:
            raise ValueError(f"final_switch: top-1 vectors differ in length ({h.shape} vs {final.shape})")
        out.append(float((h != final).mean()) if final.size else 0.0)
    return out


def overlap_with_final(history: Sequence) -> list[float]:
    """LibMoE's routing overlap: for each evaluation, the share of probe tokens whose dispatched top-1
    expert equals the final checkpoint's (1 - `final_switch`; the last entry is 1)."""
    return [1.0 - v for v in final_switch(history)]


def last_fluctuation_step(history: Sequence, steps: Sequence[int]) -> int | None:
    """StableMoE's fluctuation end: the step of the last evaluation at which any probe token's top-1
    expert changed from the evaluation before; after it the routing is frozen. The first step when
    nothing ever changed; None without history."""
    if len(history) == 0:
        return None
    if len(history) != len(steps):
        raise ValueError(f"last_fluctuation_step: {len(history)} top-1 vectors but {len(steps)} steps")
    last = 0
    for i in range(1, len(history)):
        a, b = _np(history[i - 1]).reshape(-1), _np(history[i]).reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"last_fluctuation_step: top-1 vectors differ in length ({a.shape} vs {b.shape})")
        if (a != b).any():
            last = i
    return int(steps[last])


def settle_fraction(history: Sequence, steps: Sequence[int], total_steps: int | None = None) -> float | None:
    """Mean over probe tokens of the step after which the token's top-1 never changes again (the step
    of the first evaluation from which it always equals the final assignment), divided by the last
    step (or ``total_steps``): 0 = routing fixed from the first evaluation, near 1 = still moving."""
    if len(history) == 0:
        return None
    if len(history) != len(steps):
        raise ValueError(f"settle_fraction: {len(history)} top-1 vectors but {len(steps)} steps")
    h = np.stack([_np(x).reshape(-1) for x in history])  # (evals, tokens)
    if h.shape[1] == 0:
        return None
    same = h == h[-1:]
    # first index i such that same[i:] all True: count trailing True run per token
    trailing = np.flip(np.cumprod(np.flip(same, 0), 0), 0).astype(bool)
    first = trailing.argmax(0)  # trailing[-1] is always True, so argmax finds the first True
    settle = np.asarray(steps, dtype=np.float64)[first]
    denom = float(total_steps if total_steps is not None else steps[-1])
    return None if denom <= 0 else float(settle.mean() / denom)


def moved_from_init(init_top1, cur_top1) -> float | None:
    """Share in [0, 1] of the probe tokens whose dispatched top-1 expert differs from the one at step 0
    (before training): 0 = the router never left its initial routing (e.g. a fixed hash, or a learned
    gate the task loss never moved)."""
    return switch_rate(init_top1, cur_top1)


# ----------------------------------------------------------------------------------------------------
# collapse (does the router route at all?)

#: A layer is ``collapsed`` when one expert takes more than this share of the dispatched first choices.
#: Why 0.5: above it one expert gets more first choices than all the other E - 1 together, so the
#: layer is mostly one MLP whatever the router is called (4x the uniform share 1/E at E = 8; with top-2
#: routing a second choice may still spread, but the first one decides most of the output). It is a
#: majority rule that does not depend on E, unlike 2/E (the issue's step-0 bar for a fixed upcycling),
#: which at E = 8 would flag routers that are merely uneven (one expert at 26 %).
COLLAPSE_SHARE = 0.5


def first_choice_max_share(top1_counts) -> float | None:
    """Share of the dispatched first choices (top-1, unrouted tokens excluded) that go to the most
    popular expert: 1/E = perfectly spread, 1 = every token's first choice is the same expert."""
    c = _counts(top1_counts)
    total = c.sum()
    return None if total == 0 else float(c.max() / total)


def collapsed(share: float | None) -> bool | None:
    """True when ``first_choice_max_share`` exceeds `COLLAPSE_SHARE` (None without a share)."""
    return None if share is None else bool(share > COLLAPSE_SHARE)


# ----------------------------------------------------------------------------------------------------
# specialisation


def mutual_information(label_by_expert) -> float | None:
    """I(expert; label) = sum_{l,e} p(l,e) log(p(l,e) / (p(l) p(e))) in nats, from a label-by-expert
    count matrix (rows labels, columns experts). None for an empty matrix."""
    m = _np(label_by_expert).astype(np.float64)
    if m.ndim != 2:
        raise ValueError(f"label_by_expert must be 2-D (labels x experts), got shape {m.shape}")
    n = m.sum()
    if n == 0:
        return None
    p = m / n
    pl = p.sum(1, keepdims=True)
    pe = p.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.where(p > 0, pl * pe, 1.0)), 0.0)
    return float(max(terms.sum(), 0.0))


def label_entropy(label_by_expert) -> float | None:
    """H(label) in nats from the row sums of a label-by-expert count matrix."""
    m = _np(label_by_expert).astype(np.float64)
    n = m.sum()
    return None if n == 0 else float(_entropy(m.sum(1) / n))


def normalized_mutual_information(label_by_expert) -> float | None:
    """I(expert; label) / H(label) in [0, 1]: the share of the label's uncertainty the expert choice
    removes. None when H(label) = 0 (a single label)."""
    mi, h = mutual_information(label_by_expert), label_entropy(label_by_expert)
    return None if mi is None or not h else float(mi / h)


# ----------------------------------------------------------------------------------------------------
# accumulation over an evaluation pass

#: per-layer scalar stats written to metrics.jsonl / final.json; `mean` averages each over layers.
#: balance = switch_balance(), margin = top1_margin(), mutual_info(_norm) = (normalized_)mutual_information(),
#: switch_rate = switch_rate() against the previous probe point's assignments;
#: first_choice_max_share / collapsed = first_choice_max_share() / collapsed() of the top-1 counts.
LAYER_STATS = (
    "load_cv",
    "max_mean",
    "max_vio",
    "min_load_share",
    "max_load_share",
    "norm_entropy",
    "gini",
    "dead_experts",
    "near_dead_experts",
    "drop_rate",
    "balance",
    "gate_entropy",
    "margin",
    "fallback_rate",
    "unrouted_rate",
    "mutual_info",
    "mutual_info_norm",
    "switch_rate",
    "first_choice_max_share",
    "collapsed",
    *RECOVERY_METRICS,
    "principal_angle_mean_deg",
)


class _LayerAcc:
    def __init__(self, num_experts: int):
        self.e = num_experts
        self.counts = np.zeros(num_experts, dtype=np.int64)
        self.tokens = 0
        self.pairs = 0
        self.dropped = 0
        self.unrouted = 0
        self.scored_tokens = 0
        self.top1_counts = np.zeros(num_experts, dtype=np.int64)
        self.score_sums = np.zeros(num_experts, dtype=np.float64)
        self.entropy_sum = 0.0
        self.margin_sum = 0.0
        self.extra_sums: dict[str, float] = {}
        self.extra_weights: dict[str, float] = {}
        self.label_by_expert: np.ndarray | None = None
        self.label_unrouted: np.ndarray | None = None
        self.role_tables: dict[int, np.ndarray] = {}  # role -> (labels, E + 1) with the unrouted column
        self.top1: list[np.ndarray] = []
        self.top1_kept = 0
        # per-group moments of the layer's input (sum, sum of x x^T, count), for the principal angles
        self.group_moments: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add_extra(self, key: str, value: float, weight: float) -> None:
        self.extra_sums[key] = self.extra_sums.get(key, 0.0) + value * weight
        self.extra_weights[key] = self.extra_weights.get(key, 0.0) + weight


class RoutingStatsAccumulator:
    """Collects every MoE layer's ``stats`` over an evaluation pass through forward hooks.

    Usage::

        acc = RoutingStatsAccumulator(model, task, keep_top1=0)
        with acc:                        # hooks attached inside the block only
            for batch in loader:
                task.forward(model, to_device(batch))
                acc.update(batch)        # pairs this batch's labels with the stats just recorded
        acc.result()                     # {"mean": {...}, "per_layer": [...]}

    Per-layer results hold the `LAYER_STATS`, ``counts``, ``label_by_expert`` + ``labels`` (when the
    task labels tokens), router extras (``router_<key>``: per-token tensors averaged over tokens,
    scalars token-weighted; ``fallback`` becomes ``fallback_rate``) and mean aux losses
    (``aux_<name>``). ``keep_top1`` > 0 keeps the top-1 expert of the first ``keep_top1`` samples of
    each layer (the probe batch for stability)."""

    def __init__(self, model, task=None, keep_top1: int = 0):
        from moebench.core.layer import MoELayer

        self.task = task
        self.keep_top1 = int(keep_top1)
        self.layers: list[tuple[str, MoELayer]] = [
            (name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)
        ]
        self.label_names = list(getattr(task, "label_names", []) or [])
        # principal angles: a task with true subspaces of this rank (in its token input) and a router with
        # per-expert routing bases; the layer's inputs are then kept per group (moebench.training.recovery)
        self.subspace_rank = getattr(task, "subspace_rank", None)
        self._angle_layers = {
            name for name, m in self.layers if self.subspace_rank and hasattr(m.router, "routing_bases")
        }
        self._handles: list = []
        self.reset()

    # -- hooks -------------------------------------------------------------------------------------
    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc):
        self.detach()

    def attach(self) -> None:
        self.detach()
        for name, layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            stats = dict(module.stats)
            if name in self._angle_layers and inputs:
                stats["_input"] = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).cpu()
            self._pending[name].append(stats)

        return hook

    def reset(self) -> None:
        self._acc = {name: _LayerAcc(layer.num_experts) for name, layer in self.layers}
        self._pending: dict[str, list[dict]] = {name: [] for name, _ in self.layers}
        self._samples_seen = 0

    # -- accumulation ------------------------------------------------------------------------------
    def update(self, batch, batch_size: int | None = None) -> None:
        """Fold in the stats recorded since the last call, labelling tokens with this ``batch``."""
        if batch_size is None:
            batch_size = self.task.batch_size(batch) if self.task is not None else None
        for name, _ in self.layers:
            for stats in self._pending[name]:
                self._fold(name, stats, batch, batch_size)
            self._pending[name] = []
        if batch_size:
            self._samples_seen += batch_size

    def fold_latest(self) -> None:
        """Fold in each layer's latest forward (its ``stats``) without hooks; unlabelled."""
        for name, layer in self.layers:
            if layer.stats:
                self._pending[name].append(dict(layer.stats))
        self.update(None)

    def _fold(self, name: str, stats: dict, batch, batch_size: int | None) -> None:
        a = self._acc[name]
        tokens = int(stats.get("tokens", 0))
        if tokens == 0:
            return
        a.counts += _np(stats["counts"]).astype(np.int64).reshape(-1)[: a.e]
        a.tokens += tokens
        a.pairs += int(stats.get("pairs", 0))
        a.dropped += int(stats.get("dropped", 0))
        a.unrouted += int(stats.get("unrouted_tokens", 0))
        scores = stats.get("scores")
        top1 = stats.get("top1")
        if scores is not None:
            p = normalize_scores(scores)
            a.scored_tokens += p.shape[0]
            a.score_sums += p.sum(0)
            a.entropy_sum += float(_entropy(p).sum())
            if p.shape[1] > 1:
                top2 = -np.sort(-p, axis=1)[:, :2]
                a.margin_sum += float((top2[:, 0] - top2[:, 1]).sum())
            else:
                a.margin_sum += float(p.shape[0])
        if top1 is not None:
            t1 = _np(top1).astype(np.int64).reshape(-1)  # dispatched top-1; -1 = unrouted
            a.top1_counts += np.bincount(t1[t1 >= 0], minlength=a.e)[: a.e]
            self._fold_labels(a, name, t1, tokens, batch, batch_size, stats.get("_input"))
            if self.keep_top1 and batch_size and tokens % batch_size == 0:
                per_sample = tokens // batch_size
                want = self.keep_top1 * per_sample - a.top1_kept
                if want > 0:
                    kept = t1[:want]
                    a.top1.append(kept)
                    a.top1_kept += kept.size
        for key, value in stats.items():
            if key in ("counts", "tokens", "pairs", "dropped", "unrouted_tokens", "top1", "scores", "_input"):
                continue
            if key == "aux_losses":
                for k, v in (value or {}).items():
                    a.add_extra(f"aux_{k}", float(v), tokens)
                continue
            if isinstance(value, Tensor):
                v = value.detach().float()
                if v.numel() == tokens:
                    a.add_extra(key, float(v.mean()), tokens)
                elif v.numel() == 1:
                    a.add_extra(key, float(v), tokens)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                a.add_extra(key, float(value), tokens)

    def _fold_labels(
        self, a: _LayerAcc, name: str, top1: np.ndarray, tokens: int, batch, batch_size, x: Tensor | None = None
    ) -> None:
        if self.task is None or not batch_size or tokens % batch_size != 0:
            return
        labels = self.task.token_labels(batch, name, tokens // batch_size)
        if labels is None:
            return
        lab = _np(labels).astype(np.int64).reshape(-1)
        if lab.size != tokens:
            raise ValueError(
                f"task {type(self.task).__name__}.token_labels returned {lab.size} labels for layer {name!r} "
                f"but the layer saw {tokens} tokens ({batch_size} samples x {tokens // batch_size}); "
                f"return shape (batch, tokens_per_sample) or None"
            )
        keep = lab >= 0
        if not keep.any():
            return
        num_labels = max(len(self.label_names), int(lab[keep].max()) + 1)
        if a.label_by_expert is None:
            a.label_by_expert = np.zeros((num_labels, a.e), dtype=np.int64)
            a.label_unrouted = np.zeros(num_labels, dtype=np.int64)
        elif a.label_by_expert.shape[0] < num_labels:
            assert a.label_unrouted is not None  # allocated together with label_by_expert
            grown = np.zeros((num_labels, a.e), dtype=np.int64)
            grown[: a.label_by_expert.shape[0]] = a.label_by_expert
            a.label_by_expert = grown
            grown_u = np.zeros(num_labels, dtype=np.int64)
            grown_u[: a.label_unrouted.shape[0]] = a.label_unrouted
            a.label_unrouted = grown_u
        if x is not None and x.shape[0] == tokens:
            self._fold_moments(a, x.numpy().astype(np.float64), lab, keep, num_labels)
        assert a.label_unrouted is not None
        routed = keep & (top1 >= 0)
        np.add.at(a.label_by_expert, (lab[routed], top1[routed]), 1)
        np.add.at(a.label_unrouted, lab[keep & (top1 < 0)], 1)
        roles_fn = getattr(self.task, "token_roles", None)
        roles = roles_fn(batch, name, tokens // batch_size) if roles_fn is not None else None
        if roles is not None:
            role = _np(roles).astype(np.int64).reshape(-1)
            col = np.where(top1 >= 0, top1, a.e)  # unrouted: its own category, column E
            for r in np.unique(role[keep]):
                sel = keep & (role == r)
                table = a.role_tables.setdefault(int(r), np.zeros((num_labels, a.e + 1), dtype=np.int64))
                if table.shape[0] < num_labels:
                    table = a.role_tables[int(r)] = np.vstack(
                        [table, np.zeros((num_labels - table.shape[0], a.e + 1), dtype=np.int64)]
                    )
                np.add.at(table, (lab[sel], col[sel]), 1)

    @staticmethod
    def _fold_moments(a: _LayerAcc, x: np.ndarray, lab: np.ndarray, keep: np.ndarray, num_labels: int) -> None:
        d = x.shape[1]
        if a.group_moments is None or a.group_moments[2].shape[0] < num_labels:
            old = a.group_moments
            a.group_moments = (np.zeros((num_labels, d)), np.zeros((num_labels, d, d)), np.zeros(num_labels))
            if old is not None:
                for new, prev in zip(a.group_moments, old, strict=True):
                    new[: prev.shape[0]] = prev
        sums, outer, counts = a.group_moments
        for g in np.unique(lab[keep]):
            xs = x[keep & (lab == g)]
            sums[g] += xs.sum(0)
            outer[g] += xs.T @ xs
            counts[g] += xs.shape[0]

    def _principal_angles(self, name: str, a: _LayerAcc) -> dict | None:
        """Each expert's routing basis against its matched group's principal subspace, both in the layer's
        input space (the true U_c mapped through the layers before the MoE is not a subspace when they
        are nonlinear; the group's top-rank principal subspace of the layer input is what the router sees)."""
        if name not in self._angle_layers or a.group_moments is None:
            return None
        assert self.subspace_rank is not None  # set whenever _angle_layers is
        rank = int(self.subspace_rank)
        true = group_subspaces(*a.group_moments, rank=rank)
        layer = dict(self.layers)[name]
        bases = layer.router.routing_bases(rank).detach().cpu().double().numpy()
        return principal_angles(list(bases), true)

    # -- results -----------------------------------------------------------------------------------
    def top1(self) -> dict[str, np.ndarray]:
        """Kept top-1 assignments per layer (the probe's), as int16 arrays."""
        return {
            name: (np.concatenate(a.top1) if a.top1 else np.zeros(0, dtype=np.int64)).astype(np.int16)
            for name, a in self._acc.items()
        }

    def per_layer(self) -> list[dict]:
        out = []
        for name, a in self._acc.items():
            d: dict = {"layer": name}
            d["load_cv"] = load_cv(a.counts) if a.counts.sum() else None
            d["max_mean"] = max_mean_load(a.counts) if a.counts.sum() else None
            d["max_vio"] = max_violation(a.counts) if a.counts.sum() else None
            share = load_share_range(a.counts) if a.counts.sum() else None
            d["min_load_share"], d["max_load_share"] = share if share else (None, None)
            d["norm_entropy"] = norm_entropy(a.counts) if a.counts.sum() else None
            d["gini"] = gini(a.counts) if a.counts.sum() else None
            d["dead_experts"] = dead_experts(a.counts) if a.tokens else None
            d["near_dead_experts"] = near_dead_experts(a.counts) if a.tokens else None
            d["drop_rate"] = drop_rate(a.dropped, a.pairs)
            st = a.scored_tokens
            d["balance"] = switch_balance_from_sums(a.top1_counts, a.score_sums, st) if st else None
            d["gate_entropy"] = a.entropy_sum / st if st else None
            d["margin"] = a.margin_sum / st if st else None
            fb_w = a.extra_weights.get("fallback", 0.0)
            d["fallback_rate"] = a.extra_sums["fallback"] / fb_w if fb_w else None
            d["unrouted_rate"] = unrouted_rate(a.unrouted, a.tokens)
            # unrouted tokens are their own category: MI over (label, expert or "unrouted")
            lbe = (
                None
                if a.label_by_expert is None or a.label_unrouted is None
                else np.hstack([a.label_by_expert, a.label_unrouted[:, None]])
            )
            d["mutual_info"] = mutual_information(lbe) if lbe is not None else None
            d["mutual_info_norm"] = normalized_mutual_information(lbe) if lbe is not None else None
            d["switch_rate"] = None  # filled by the trainer from the probe history
            d["first_choice_max_share"] = first_choice_max_share(a.top1_counts) if a.top1_counts.sum() else None
            d["collapsed"] = collapsed(d["first_choice_max_share"])
            if lbe is not None:  # structure recovery (moebench.training.recovery), same (label, expert) table
                d.update(recovery(lbe, a.e))
                role_names = list(getattr(self.task, "role_names", []) or [])
                d["recovery_by_role"] = {
                    (role_names[r] if r < len(role_names) else str(r)): recovery(t, a.e)
                    for r, t in sorted(a.role_tables.items())
                }
            angles = self._principal_angles(name, a)
            if angles is not None:
                d.update(angles)
            for key in sorted(a.extra_sums):
                if key == "fallback":
                    continue
                out_key = key if key.startswith("aux_") else f"router_{key}"
                d[out_key] = a.extra_sums[key] / a.extra_weights[key] if a.extra_weights[key] else None
            d["tokens"] = a.tokens
            d["counts"] = a.counts.tolist()
            d["top1_counts"] = a.top1_counts.tolist()  # dispatched top-1 per expert (unrouted excluded)
            d["unrouted_tokens"] = a.unrouted
            if lbe is not None:
                assert a.label_by_expert is not None and a.label_unrouted is not None  # lbe is built from them
                d["label_by_expert"] = a.label_by_expert.tolist()
                d["label_unrouted"] = a.label_unrouted.tolist()
                n = lbe.shape[0]
                names = self.label_names[:n] + [str(i) for i in range(len(self.label_names), n)]
                d["labels"] = names
            out.append(d)
        return out

    def result(self) -> dict:
        per_layer = self.per_layer()
        return {
            "mean": mean_over_layers(per_layer),
            "per_layer": per_layer,
            "recovery_by_role": mean_recovery_by_role(per_layer),
        }


def mean_over_layers(per_layer: list[dict]) -> dict:
    """Mean of every scalar stat over the layers that define it (None where no layer does); a
    true / false stat (``collapsed``) is true for the run when any layer's is."""
    keys: list[str] = []
    for d in per_layer:
        for k, v in d.items():
            if k not in keys and k not in ("layer", "tokens") and (v is None or isinstance(v, (int, float))):
                keys.append(k)
    mean: dict = {}
    for k in keys:
        flags = [d[k] for d in per_layer if isinstance(d.get(k), bool)]
        if flags:
            mean[k] = any(flags)
            continue
        vals = [d[k] for d in per_layer if isinstance(d.get(k), (int, float))]
        mean[k] = float(np.mean(vals)) if vals else None
    return mean
