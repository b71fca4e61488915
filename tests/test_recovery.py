"""Structure-recovery metrics (moebench.training.recovery) against scikit-learn and hand cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from moebench.training.recovery import (
    ari,
    h_expert_given_group,
    h_group_given_expert,
    mean_recovery_by_role,
    nmi,
    recovery,
    routing_accuracy,
)


def _table(groups, experts, k, e):
    c = np.zeros((k, e), dtype=int)
    np.add.at(c, (groups, experts), 1)
    return c


@pytest.mark.parametrize("seed, k, e, purity", [(0, 4, 4, 0.9), (1, 4, 8, 0.5), (2, 3, 5, 0.0), (3, 6, 2, 0.7)])
def test_nmi_and_ari_equal_sklearn_on_the_same_pairs(seed, k, e, purity):
    rng = np.random.default_rng(seed)
    g = rng.integers(k, size=3000)
    ex = np.where(rng.random(3000) < purity, g % e, rng.integers(e, size=3000))
    c = _table(g, ex, k, e)
    assert nmi(c) == pytest.approx(normalized_mutual_info_score(g, ex), abs=1e-10)
    assert ari(c) == pytest.approx(adjusted_rand_score(g, ex), abs=1e-10)


def test_conditional_entropies_by_hand():
    # group 0 split evenly over experts 0 and 1; group 1 all on expert 1
    c = np.array([[5, 5], [0, 10]])
    # H(expert | group) = 0.5 * log 2 + 0.5 * 0
    assert h_expert_given_group(c) == pytest.approx(0.5 * math.log(2))
    # expert 0 pure; expert 1 holds 5 of group 0 and 10 of group 1 (3/4 of the tokens)
    h1 = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    assert h_group_given_expert(c) == pytest.approx(0.75 * h1)


def test_a_permuted_perfect_partition_scores_perfectly_and_collapse_scores_zero():
    perfect = np.array([[0, 7, 0, 0], [0, 0, 0, 9], [8, 0, 0, 0], [0, 0, 6, 0]])
    r = recovery(perfect, 4)
    assert r == {
        "nmi": 1.0,
        "ari": 1.0,
        "h_group_given_expert": 0.0,
        "h_expert_given_group": 0.0,
        "routing_accuracy": 1.0,
    }
    collapse = np.array([[10, 0, 0, 0]] * 4)
    r = recovery(collapse, 4)
    assert r["nmi"] == 0.0 and r["ari"] == 0.0 and r["routing_accuracy"] == 0.25
    assert r["h_group_given_expert"] == pytest.approx(math.log(4)) and r["h_expert_given_group"] == 0.0


def test_routing_accuracy_needs_as_many_experts_as_groups_and_counts_unrouted_as_wrong():
    assert routing_accuracy(np.ones((3, 4)), 4) is None
    # E = 2 experts + an "unrouted" column: 2 of group 0's 10 tokens were sent nowhere
    c = np.array([[8, 0, 2], [0, 10, 0]])
    assert routing_accuracy(c, 2) == pytest.approx(18 / 20)
    # the unrouted column is a category of its own: pure in group, but group 0 is now split in two
    assert h_group_given_expert(c) == pytest.approx(0.0, abs=1e-12) and h_expert_given_group(c) > 0.1


def test_empty_tables_give_none_and_bad_tables_are_refused():
    assert recovery(np.zeros((2, 2)), 2) == dict.fromkeys(
        ("nmi", "ari", "h_group_given_expert", "h_expert_given_group", "routing_accuracy")
    )
    with pytest.raises(ValueError, match="2-D"):
        nmi(np.zeros(3))


def test_per_role_means_skip_layers_without_a_value():
    layers = [
        {"recovery_by_role": {"centre": {"nmi": 1.0, "routing_accuracy": None}}},
        {"recovery_by_role": {"centre": {"nmi": 0.5, "routing_accuracy": 0.5}}},
        {},
    ]
    assert mean_recovery_by_role(layers) == {"centre": {"nmi": 0.75, "routing_accuracy": 0.5}}


def test_principal_angles_on_hand_made_bases():
    """Known angles: e1 vs cos(t) e1 + sin(t) e2 is t; a basis equal to the true subspace gives 0 degrees;
    the Hungarian match pairs each subspace with its own expert whatever the expert order."""
    import numpy as np

    from moebench.training.recovery import principal_angles

    e = np.eye(6)
    t = np.radians(30.0)
    true = [e[:, [0, 1]], e[:, [2, 3]]]
    tilted = np.stack([np.cos(t) * e[:, 0] + np.sin(t) * e[:, 4], e[:, 1]], 1)  # angles 0 and 30 to span(e0, e1)
    out = principal_angles([e[:, [2, 3]], tilted], true)
    assert out["principal_angle_match"] == [1, 0]
    assert np.allclose(out["principal_angles_deg"][0], [0.0, 30.0], atol=1e-6)
    assert np.allclose(out["principal_angles_deg"][1], [0.0, 0.0], atol=1e-6)
    assert abs(out["principal_angle_mean_deg"] - 7.5) < 1e-6
    # a basis equal to the true subspaces (any spanning columns, a larger basis that contains them) -> ~0
    rng = np.random.default_rng(0)
    u = [np.linalg.qr(rng.normal(size=(32, 4)))[0] for _ in range(4)]
    mixed = [ui @ rng.normal(size=(4, 4)) for ui in u]
    assert principal_angles(mixed[::-1], u)["principal_angle_mean_deg"] < 1e-4
    bigger = [np.hstack([ui, rng.normal(size=(32, 4))]) for ui in u]
    assert principal_angles(bigger, u)["principal_angle_mean_deg"] < 1e-4
    # orthogonal: 90 degrees
    assert abs(principal_angles([e[:, [4, 5]]], [e[:, [0, 1]]])["principal_angle_mean_deg"] - 90.0) < 1e-6
    assert principal_angles([], u) is None


def test_group_subspaces_recovers_each_groups_span():
    import numpy as np

    from moebench.training.recovery import group_subspaces, principal_angles

    rng = np.random.default_rng(1)
    u = [np.linalg.qr(rng.normal(size=(16, 3)))[0] for _ in range(2)]
    xs = [rng.normal(size=(4000, 3)) @ ui.T + 5.0 + 0.01 * rng.normal(size=(4000, 16)) for ui in u]  # shared offset
    sums = np.stack([x.sum(0) for x in xs])
    outer = np.stack([x.T @ x for x in xs])
    found = group_subspaces(sums, outer, np.array([4000, 4000]), rank=3)
    assert principal_angles(found, u)["principal_angle_mean_deg"] < 1.0


def test_eigen_routers_expose_per_expert_bases():
    import torch

    from moebench.routers.emoe import EMoERouter

    r = EMoERouter(d_model=32, num_experts=4, rank=16)
    b = r.routing_bases(4)
    assert b.shape == (4, 32, 4)
    assert torch.allclose(b.mT @ b, torch.eye(4).expand(4, 4, 4), atol=1e-4)  # columns of the orthonormal Q


def test_small_assignments_match_scipy():
    """The exhaustive solver for small tables finds the Hungarian optimum (scipy's) on random tables."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from moebench.training.recovery import best_assignment

    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 6))
        c = rng.random((k, int(rng.integers(k, 9))))
        for maximize in (True, False):
            r, col = linear_sum_assignment(c, maximize=maximize)
            r2, col2 = best_assignment(c, maximize=maximize)
            assert abs(c[r, col].sum() - c[r2, col2].sum()) < 1e-12 and len(set(col2.tolist())) == k
