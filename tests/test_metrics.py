"""Hand-computed values for every shared metric, and the accumulator on a model with known routing."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from moebench.core.layer import MoELayer
from moebench.training import metrics as M


# --- load balance -----------------------------------------------------------------------------------
def test_uniform_counts_are_perfectly_balanced():
    c = [5, 5, 5, 5]
    assert M.load_cv(c) == 0.0
    assert M.max_mean_load(c) == 1.0
    assert M.norm_entropy(c) == pytest.approx(1.0)
    assert M.gini(c) == 0.0
    assert M.dead_experts(c) == 0


def test_one_hot_counts():
    c = torch.tensor([0, 0, 8, 0])
    assert M.load_cv(c) == pytest.approx(math.sqrt(3))  # mean 2, population std sqrt(12)
    assert M.max_mean_load(c) == pytest.approx(4.0)
    assert M.norm_entropy(c) == pytest.approx(0.0)
    assert M.gini(c) == pytest.approx(0.75)  # (E - 1) / E
    assert M.dead_experts(c) == 3


def test_two_expert_counts():
    c = np.array([1, 3])
    assert M.load_cv(c) == pytest.approx(0.5)
    assert M.max_mean_load(c) == pytest.approx(1.5)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert M.norm_entropy(c) == pytest.approx(h / math.log(2))
    assert M.gini(c) == pytest.approx(0.25)  # (|1-3| + |3-1|) / (2 * 4 * 2)


def test_empty_and_bad_counts():
    assert M.load_cv([0, 0]) is None and M.norm_entropy([0, 0]) is None
    with pytest.raises(ValueError, match="counts must be >= 0"):
        M.load_cv([1, -1])


def test_drop_rate():
    assert M.drop_rate(dropped=1, pairs=3) == pytest.approx(0.25)
    assert M.drop_rate(0, 0) is None


def test_switch_balance_uniform_is_one_and_collapse_is_E():
    scores = torch.full((6, 3), 1 / 3)
    assert M.switch_balance(torch.tensor([0, 0, 0, 0, 0, 0]), scores) == pytest.approx(1.0)
    one_hot = torch.zeros(6, 3)
    one_hot[:, 1] = 1
    assert M.switch_balance(torch.ones(6, dtype=torch.long), one_hot) == pytest.approx(3.0)
    # from sums: the same numbers
    assert M.switch_balance_from_sums([0, 6, 0], one_hot.sum(0), 6) == pytest.approx(3.0)


# --- router -----------------------------------------------------------------------------------------
def test_gate_entropy_and_margin():
    assert M.gate_entropy(torch.full((4, 4), 0.25)) == pytest.approx(math.log(4))
    assert M.gate_entropy(torch.eye(4)) == pytest.approx(0.0)
    assert M.top1_margin(torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2]])) == pytest.approx((0.5 + 0.0) / 2)
    # unnormalised / negative scores: clamp at 0 then divide by the row sum
    assert M.top1_margin(torch.tensor([[3.0, 1.0, -5.0]])) == pytest.approx(0.5)
    assert M.gate_entropy(torch.zeros(2, 4)) == pytest.approx(math.log(4))  # all-zero row -> uniform


def test_fallback_and_unrouted_rates():
    assert M.fallback_rate(3, 12) == pytest.approx(0.25)
    assert M.unrouted_rate(2, 8) == pytest.approx(0.25)
    assert M.unrouted_rate(0, 0) is None


# --- stability --------------------------------------------------------------------------------------
def test_switch_rate():
    assert M.switch_rate([0, 1, 2, 3], [0, 1, 3, 3]) == pytest.approx(0.25)
    assert M.switch_rate(None, [0, 1]) is None
    with pytest.raises(ValueError, match="equal length"):
        M.switch_rate([0, 1], [0, 1, 2])


def test_final_switch_and_settle_fraction():
    hist = [np.array([0, 0, 0, 0]), np.array([1, 0, 0, 0]), np.array([1, 1, 0, 0])]
    assert M.final_switch(hist) == pytest.approx([0.5, 0.25, 0.0])
    # token 0 settles at step 20, token 1 at 30, tokens 2 and 3 at 10: mean 17.5 of 30 steps
    assert M.settle_fraction(hist, [10, 20, 30]) == pytest.approx(17.5 / 30)
    # a token that leaves and comes back has not settled before its last change
    back = [np.array([2]), np.array([1]), np.array([2])]
    assert M.final_switch(back) == pytest.approx([0.0, 1.0, 0.0])
    assert M.settle_fraction(back, [10, 20, 30]) == pytest.approx(1.0)
    assert M.final_switch([]) == []


# --- specialisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5])
def test_mutual_information_of_diagonal_is_log_n(n):
    m = 7 * np.eye(n)
    assert M.mutual_information(m) == pytest.approx(math.log(n))
    assert M.normalized_mutual_information(m) == pytest.approx(1.0)


def test_mutual_information_independent_and_degenerate():
    indep = np.outer([1, 3], [2, 2, 4])  # p(l, e) = p(l) p(e)
    assert M.mutual_information(indep) == pytest.approx(0.0, abs=1e-12)
    one_label = np.array([[3, 5, 0]])
    assert M.mutual_information(one_label) == pytest.approx(0.0)
    assert M.normalized_mutual_information(one_label) is None  # H(label) = 0
    assert M.mutual_information(np.zeros((2, 2))) is None
    # 2 labels, 2 experts, label 0 always on expert 0, label 1 split evenly: I = H(E) - H(E|L)
    m = np.array([[2, 0], [1, 1]])
    h_e = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert M.mutual_information(m) == pytest.approx(h_e - 0.5 * math.log(2))


# --- accumulator ------------------------------------------------------------------------------------
class _TwoLayer(nn.Module):
    def __init__(self, router="uniform", router_args=None):
        super().__init__()
        self.a = MoELayer(8, 16, 4, router=router, router_args=router_args or {"top_k": 1})
        self.b = MoELayer(8, 16, 4, router=router, router_args=router_args or {"top_k": 1})

    def forward(self, x):
        return self.b(x + self.a(x))


class _LabelTask:
    """Token t of a sample has label t % 4 in layer a; layer b's tokens carry no label except -1."""

    label_names = ["l0", "l1", "l2", "l3"]

    def batch_size(self, batch):
        return batch.shape[0]

    def token_labels(self, batch, layer_name, tokens_per_sample):
        b = batch.shape[0]
        if layer_name == "a":
            return torch.arange(tokens_per_sample).remainder(4).expand(b, -1)
        return torch.full((b, tokens_per_sample), -1)


def test_accumulator_counts_labels_and_probe():
    torch.manual_seed(0)
    model = _TwoLayer().eval()
    task = _LabelTask()
    acc = M.RoutingStatsAccumulator(model, task, keep_top1=3)
    with acc, torch.no_grad():
        for _ in range(2):
            batch = torch.randn(2, 4, 8)  # 2 samples x 4 tokens: uniform router sends token t to t % 4
            model(batch)
            acc.update(batch)
    model(torch.randn(2, 4, 8))  # hooks are detached: this forward is not counted
    res = acc.result()
    a, b = res["per_layer"]
    assert a["layer"] == "a" and b["layer"] == "b"
    assert a["counts"] == [4, 4, 4, 4] and a["tokens"] == 16
    assert a["load_cv"] == 0.0 and a["norm_entropy"] == pytest.approx(1.0) and a["dead_experts"] == 0
    assert a["drop_rate"] == 0.0 and a["unrouted_rate"] == 0.0
    assert a["gate_entropy"] == pytest.approx(0.0) and a["margin"] == pytest.approx(1.0)
    assert a["balance"] == pytest.approx(1.0)
    assert a["label_by_expert"] == (4 * np.eye(4, dtype=int)).tolist()
    assert a["labels"] == task.label_names
    assert a["mutual_info"] == pytest.approx(math.log(4)) and a["mutual_info_norm"] == pytest.approx(1.0)
    assert "label_by_expert" not in b and b["mutual_info"] is None  # all -1: skipped
    assert res["mean"]["mutual_info"] == pytest.approx(math.log(4))  # only layer a defines it
    assert res["mean"]["load_cv"] == 0.0
    # probe: first 3 samples (the whole first batch, one sample of the second) = 12 tokens
    top1 = acc.top1()
    assert top1["a"].tolist() == [0, 1, 2, 3] * 3


def test_accumulator_records_aux_losses_and_drops():
    torch.manual_seed(0)
    layer_args = {"top_k": 1, "capacity_factor": 0.5, "eval_capacity_factor": 0.5, "jitter": 0.0}
    model = _TwoLayer(router="switch", router_args=layer_args).eval()
    acc = M.RoutingStatsAccumulator(model, None)
    with acc, torch.no_grad():
        x = torch.randn(4, 8, 8)
        model(x)
        acc.update(x, batch_size=4)
    a = acc.per_layer()[0]
    # capacity ceil(0.5 * 32 / 4) = 4 per expert: at most 16 of 32 tokens are kept
    assert sum(a["counts"]) <= 16
    assert a["drop_rate"] == pytest.approx((32 - sum(a["counts"])) / 32)
    assert a["aux_balance"] > 0 and "aux_z" in a
    assert "label_by_expert" not in a
