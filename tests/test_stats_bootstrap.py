"""Bootstrap, Holm and rank groups on hand-made data with known answers (issue 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moebench.report.stats import (
    bootstrap_mean,
    holm,
    minimum_detectable_effect,
    paired_bootstrap,
    rank_groups,
)


def test_holm_textbook_example():
    # p = .01, .04, .03, .005 (m = 4): sorted .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> running max .06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.01, math.nan])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])  # NaN does not count towards m


def test_paired_bootstrap_constant_difference_has_a_degenerate_interval():
    a = np.array([[1.0, 2.0, 3.0, 4.0]] * 3)
    res = paired_bootstrap(a + 0.5, a, n_boot=500)
    assert (res.mean, res.ci_low, res.ci_high, res.se) == pytest.approx((0.5, 0.5, 0.5, 0.0))
    assert res.p_value == pytest.approx(2 / 501)  # every resample is above 0: the smallest p possible
    assert (res.n_seeds, res.n_items) == (3, 4)


def test_paired_bootstrap_matches_the_normal_theory_standard_error():
    # one seed, n items with +1 / -1 differences of mean 0.2: the bootstrap SE of a mean is sd/sqrt(n)
    rng = np.random.default_rng(1)
    n = 2000
    d = np.where(rng.random(n) < 0.6, 1.0, -1.0)
    res = paired_bootstrap(d[None, :], np.zeros((1, n)), n_boot=4000, seed=3)
    want_se = d.std() / math.sqrt(n)
    assert res.mean == pytest.approx(d.mean())
    assert res.se == pytest.approx(want_se, rel=0.06)
    assert res.ci_low == pytest.approx(d.mean() - 1.96 * want_se, abs=0.4 * want_se)
    assert res.ci_high == pytest.approx(d.mean() + 1.96 * want_se, abs=0.4 * want_se)
    assert res.p_value < 0.01


def test_paired_bootstrap_no_difference_is_not_significant():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=(3, 300)).astype(float)
    res = paired_bootstrap(a, a[:, ::-1].copy(), n_boot=1000)
    assert res.ci_low < 0 < res.ci_high or res.mean == 0
    assert res.p_value > 0.05


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    items = np.ones((1, 200))
    agree = np.vstack([items, items, items])
    disagree = np.vstack([items * 0.0, items * 1.0, items * 2.0])
    assert bootstrap_mean(agree).se == 0.0
    assert bootstrap_mean(disagree).se > 0.3  # seed means 0, 1, 2: SE of their mean ~ 0.82 / sqrt(3) * sqrt(2/3)


def test_paired_bootstrap_rejects_unpaired_shapes():
    with pytest.raises(ValueError, match="matching"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((2, 6)))


def test_rank_groups():
    entries = [
        ("a", 0.90, 0.88, 0.92),
        ("b", 0.89, 0.87, 0.91),
        ("c", 0.80, 0.78, 0.86),
        ("d", 0.70, 0.65, 0.75),
        ("e", math.nan, math.nan, math.nan),
    ]
    assert rank_groups(entries) == {"a": 1, "b": 1, "c": 2, "d": 3}
    # lower is better (MAE): the smallest mean leads
    assert rank_groups([("x", 3.0, 2.5, 3.5), ("y", 3.4, 3.2, 3.6), ("z", 5.0, 4.0, 6.0)], higher_is_better=False) == {
        "x": 1,
        "y": 1,
        "z": 2,
    }


def test_minimum_detectable_effect():
    assert minimum_detectable_effect(1.0) == pytest.approx(1.959964 + 0.841621, rel=1e-5)
    assert minimum_detectable_effect(0.01, power=0.5) == pytest.approx(0.0196, rel=1e-3)


def test_resample_weights_are_drawn_once_per_shape_and_give_the_same_numbers():
    """A report makes hundreds of comparisons of one shape: the weights are drawn once (cached) and
    a cached draw gives exactly what a fresh draw gives."""
    from moebench.report import stats as S

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    S._resample_weights.cache_clear()
    first = S.paired_bootstrap(a, b)
    again = S.paired_bootstrap(a, b)
    assert first == again and S._resample_weights.cache_info().hits >= 1
    w, _ = S._resample_weights(3, 50, 2000, 0)
    with pytest.raises(ValueError):
        w[0, 0] = 1.0  # shared between calls: read-only
    fresh = np.random.default_rng(0).multinomial(50, np.full(50, 1 / 50), size=2000)
    assert np.array_equal(w, fresh)


def test_stratified_iqm_interval_equals_the_one_resample_at_a_time_definition():
    """The vectorised interval (one trim_mean over all resamples) is the loop it replaced."""
    import pandas as pd
    from scipy import stats

    from moebench.report.aggregate import stratified_iqm_interval

    rng = np.random.default_rng(1)
    df = pd.DataFrame({"bench": np.repeat(list("abcd"), [3, 6, 9, 12]), "score": rng.normal(size=30)})
    groups = [g["score"].to_numpy() for _, g in df.groupby("bench")]
    r = np.random.default_rng(0)
    boot = [
        stats.trim_mean(np.concatenate([g[r.integers(0, g.size, g.size)] for g in groups]), 0.25) for _ in range(2000)
    ]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    est = stats.trim_mean(np.concatenate(groups), 0.25)
    # equal up to float rounding (numpy sums a row of a matrix and a lone vector in a different order)
    assert np.allclose(stratified_iqm_interval(df), (est, lo, hi), rtol=1e-12, atol=0)
