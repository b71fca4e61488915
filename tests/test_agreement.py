"""Cross-seed agreement on hand cases: permuted expert indices agree fully, known partial overlaps give
their share, unrouted tokens count as their own answer, and a results folder's probe_top1.npz is read as
untrusted input (no pickles, no links, a damaged file is absent with its reason)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_report import write_run

from moebench.report.agreement import load_jsd, match_experts, top1_agreement
from moebench.report.build import build_report
from moebench.training.records import (
    PROBE_TOP1_FILE,
    CorruptRecordError,
    atomic_write_json,
    read_probe_top1,
    write_probe_top1,
)


def test_permuted_expert_indices_agree_fully():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, 500)
    perm = rng.permutation(8)
    assert top1_agreement(a, perm[a]) == 1.0
    assert (match_experts(a, perm[a]) == perm).all()
    assert np.mean(a == perm[a]) < 0.5  # without matching the indices would look unrelated


def test_partial_agreement_by_hand():
    a = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    b = np.array([1, 1, 0, 0, 0, 0, 2, 1])  # best matching 0->1, 1->0, 2->2: tokens 0,1,3,4,5,6 agree
    assert top1_agreement(a, b) == pytest.approx(6 / 8)
    assert top1_agreement(a, a) == 1.0


def test_unrouted_tokens_agree_only_with_unrouted():
    a = np.array([-1, -1, 0, 1])
    b = np.array([-1, 1, 1, 0])
    assert top1_agreement(a, b) == pytest.approx(3 / 4)  # token 0 both unrouted; 2, 3 after swapping
    assert top1_agreement([-1, -1], [-1, -1]) == 1.0 and top1_agreement([-1, -1], [0, 0]) == 0.0


def test_load_jsd_is_zero_under_the_matching_and_known_otherwise():
    assert load_jsd([10, 30, 60], [60, 10, 30], np.array([1, 2, 0])) == pytest.approx(0.0, abs=1e-12)
    # disjoint supports: JSD = 1 bit; half overlap: p=(1,0), q=(.5,.5) -> JSD = 1 - 0.75 log2(4/3) ... by hand
    assert load_jsd([1, 0], [0, 1], np.array([0, 1])) == pytest.approx(1.0)
    m = np.array([0.75, 0.25])
    kl = lambda p, q: sum(x * np.log2(x / y) for x, y in zip(p, q) if x > 0)  # noqa: E731
    assert load_jsd([1, 0], [1, 1], np.array([0, 1])) == pytest.approx(0.5 * kl([1, 0], m) + 0.5 * kl([0.5, 0.5], m))


def test_probe_file_round_trip_and_untrusted_input(tmp_path):
    path = tmp_path / PROBE_TOP1_FILE
    write_probe_top1(path, {"blocks.0.mlp": np.array([0, 3, -1], dtype=np.int16), "blocks.1.mlp": np.array([2, 2, 1])})
    names, layers = read_probe_top1(path)
    assert names == ["blocks.0.mlp", "blocks.1.mlp"] and layers[0].tolist() == [0, 3, -1]
    assert read_probe_top1(tmp_path / "absent.npz") is None
    np.savez(tmp_path / "pickled.npz", names=np.array(["x"]), layer0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CorruptRecordError, match="not a readable"):
        read_probe_top1(tmp_path / "pickled.npz")  # object arrays need pickle: refused
    np.savez(tmp_path / "float.npz", names=np.array(["x"]), layer0=np.array([0.5]))
    with pytest.raises(CorruptRecordError, match="1-D integer"):
        read_probe_top1(tmp_path / "float.npz")
    os.symlink(path, tmp_path / "link.npz")
    with pytest.raises(CorruptRecordError, match="symbolic link"):
        read_probe_top1(tmp_path / "link.npz")


def _probe(run_dir, top1_per_layer):
    write_probe_top1(run_dir / PROBE_TOP1_FILE, {f"blocks.{2 * i + 1}": t for i, t in enumerate(top1_per_layer)})


def test_report_agreement_column_per_group_and_layer(tmp_path):
    grid = tmp_path / "g"
    rng = np.random.default_rng(1)
    base = rng.integers(0, 4, 64)
    for seed in range(3):
        perm = rng.permutation(4)
        # softmax-topk: every seed routes the probe tokens the same way up to relabelling -> agreement 1;
        # in layer 1 seed 2 moves the first 16 tokens to another expert -> agreement 48/64 with both others
        layer1 = perm[base].copy()
        if seed == 2:
            layer1[:16] = (layer1[:16] + 1) % 4
        run = write_run(grid, f"s-{seed}", "cls", "softmax-topk", seed, 0.6)
        _probe(run, [perm[base], layer1])
        final = json.loads((run / "final.json").read_text())
        for layer in final["routing"]["per_layer"]:  # the same load in every seed, in that seed's indices
            counts = np.zeros(4, int)
            counts[perm] = [10, 20, 30, 40]
            layer["counts"] = counts.tolist()
        atomic_write_json(run / "final.json", final)
        _probe(write_run(grid, f"e-{seed}", "cls", "ermoe-context", seed, 0.6), [rng.integers(0, 4, 64)] * 2)
        write_run(grid, f"d-{seed}", "cls", "dense", seed, 0.5)
    (grid / "e-2" / PROBE_TOP1_FILE).write_bytes(b"not a zip")  # damaged: treated as absent, said so
    rep = build_report(grid)
    runs = rep.rs.runs.set_index("run_id")
    assert runs.loc["s-0", "seed_agreement.layer0"] == 1.0
    assert runs.loc["s-0", "seed_agreement.layer1"] == pytest.approx((1 + 48 / 64) / 2)  # pairs with s-1, s-2
    assert runs.loc["s-2", "seed_agreement.layer1"] == pytest.approx(48 / 64)
    lb = rep.leaderboard.set_index("label")
    # the group's value = the mean over its 3 seed pairs: layer0 all 1; layer1 (1, .75, .75)
    assert lb.loc["softmax-topk", "seed_agreement"] == pytest.approx((1 + (1 + 0.75 + 0.75) / 3) / 2)
    assert lb.loc["softmax-topk", "seed_load_jsd"] == pytest.approx(0.0, abs=1e-12)  # same load, relabelled
    assert lb.loc["ermoe-context", "seed_load_jsd"] > 0  # loads differ (cv grows with the seed), no relabelling
    assert np.isnan(runs.loc["e-2", "seed_agreement"]) and 0 < runs.loc["e-0", "seed_agreement"] < 1
    assert np.isnan(runs.loc["d-0", "seed_agreement"])
    assert any("e-2" in p and "treated as absent" in p for p in rep.rs.problems)
    diag = next(t for b, ts in rep.bench_tables for t in ts if t.title.startswith("Routing diagnostics"))
    col = diag.columns.index("Seed agreement (%) ↑")
    row = next(r for r in diag.rows if r[0] == "softmax-topk")
    assert row[col] == f"{100 * lb.loc['softmax-topk', 'seed_agreement']:.1f}"
