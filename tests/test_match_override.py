"""A router entry's own `match:` overrides the grid's (issue 9): `match: params` control rows for the
top-1 routers tell "more parameters" apart from "better routing"."""

from __future__ import annotations

import copy

from test_grid import BASE, error_of, write

from moebench.grids import expand as expand_mod
from moebench.grids.matching import costs


def _grid(**entry):
    g = copy.deepcopy(BASE)
    g["seeds"] = [0]
    g["routers"] = ["softmax-topk", "hash", {"name": "hash", "label": "hash-params", **entry}]
    return g


def test_params_control_row_keeps_the_reference_width_and_parameters(tmp_path):
    specs = {s["label"]: s for s in expand_mod.expand(write(tmp_path, _grid(match="params")))}
    ref, flop, ctrl = specs["softmax-topk"], specs["hash"], specs["hash-params"]
    # FLOP-matched top-1 hash gets experts 2 x the top-2 reference width: twice the expert parameters
    assert (ref["moe"]["d_hidden"], flop["moe"]["d_hidden"], ctrl["moe"]["d_hidden"]) == (32, 64, 32)
    assert flop["match"]["mode"] == "active_flops" and ctrl["match"]["mode"] == "params"
    assert ctrl["match"]["expert_params"] == ref["match"]["expert_params"]
    # E * (2 d w + w + d) per MoE layer, d_model 32, E 4: w 32 -> 8448, w 64 -> 16768
    assert (ref["match"]["expert_params"], flop["match"]["expert_params"]) == (8448, 16768)
    # totals: the control differs from the reference only by softmax-topk's gate (d x E = 128, no bias)
    assert costs(ref)["params_total"] - costs(ctrl)["params_total"] == 32 * 4
    assert costs(flop)["params_total"] - costs(ctrl)["params_total"] == 16768 - 8448


def test_bad_entry_match_names_the_entry(tmp_path):
    msg = error_of(tmp_path, _grid(match="param"))
    assert "routers[2].match" in msg and "did you mean 'params'" in msg


def test_dense_takes_no_match(tmp_path):
    g = copy.deepcopy(BASE)
    g["routers"] = [{"name": "dense", "match": "params"}, "softmax-topk"]
    assert "routers[0].match" in error_of(tmp_path, g)
