"""Grid files: validation messages, deterministic expansion, stable run ids, sweeps, FLOP / parameter
matching, refusal of unmatchable grids, and `moebench grid show`. Uses the toy task (tiny models)."""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import yaml

from moebench.cli import main
from moebench.grids import expand as expand_mod
from moebench.grids import schema
from moebench.grids.pretrain import reference
from moebench.grids.schema import GridError
from moebench.training.spec import run_id

BASE = {
    "name": "toy-test",
    "task": "toy",
    "task_args": {"num_train": 64, "num_eval": 32},
    "model": {"dim": 32, "depth": 2},
    "moe": {"blocks": [-1], "num_experts": 4, "d_hidden": 32},
    "train": {"steps": 4, "batch_size": 8},
    "seeds": [0, 1],
    "routers": [
        "dense",
        "softmax-topk",
        "switch",
        "expert-choice",
        {"name": "softmax-topk", "label": "top1", "args": {"top_k": 1}},
    ],
}


def write(tmp_path, grid: dict, name: str = "g.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def error_of(tmp_path, grid: dict) -> str:
    path = write(tmp_path, grid)
    with pytest.raises(GridError) as info:
        expand_mod.expand(path)
    return str(info.value)


def with_(**changes) -> dict:
    g = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = g
        *head, last = dotted.split("__")
        for key in head:
            node = node[key]
        node[last] = value
    return g


# -- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "grid, path, expected",
    [
        (with_(moe__num_experts="eight"), "moe.num_experts", "expected an integer >= 1 and <= 4096, got 'eight' (str)"),
        (with_(train__lr=-1), "train.lr", "expected a number > 0"),
        (with_(seeds=[0, 0]), "seeds", "expected a non-empty list of distinct integers"),
        (with_(executor={"cluster": "kubernetes"}), "executor.cluster", "expected one of auto, local, slurm, debug"),
        (with_(routers=["dense", {"name": "switch", "args": [1]}]), "routers[1].args", "expected a mapping"),
        (
            with_(routers=["dense", "switch", {"name": "softmax-topk", "label": "bad", "args": {"top_k": 9}}]),
            "routers[2].args.top_k",
            "top_k=9 is invalid for num_experts=4",
        ),
        (with_(sweep={"moe.num_experts": [4, "x"]}), "sweep.moe.num_experts[1]", "expected an integer >= 1"),
        (with_(match="flops"), "match", "expected one of active_flops, params, none"),
    ],
)
def test_errors_name_file_key_path_and_expected_type(tmp_path, grid, path, expected):
    msg = error_of(tmp_path, grid)
    assert msg.startswith(f"{tmp_path / 'g.yaml'}: {path}: "), msg
    assert expected in msg


def test_task_block_paths_are_named(tmp_path):
    grid = {k: v for k, v in BASE.items() if k not in ("task", "task_args", "model")}
    grid["tasks"] = [{"task": "toy"}, {"task": "toy", "task_args": [1, 2]}]
    msg = error_of(tmp_path, grid)
    assert ": tasks[1].task_args: expected a mapping, got [1, 2] (list)" in msg


@pytest.mark.parametrize(
    "grid, path, suggestion",
    [
        ({**{k: v for k, v in BASE.items() if k != "routers"}, "rooters": ["dense"]}, "rooters", "routers"),
        (with_(moe={"blocks": [-1], "num_expert": 4}), "moe.num_expert", "num_experts"),
        (with_(routers=[{"name": "softmax-topk", "args": {"topk": 1}}]), "routers[0].args.topk", "top_k"),
        (with_(train={"step": 3}), "train.step", "steps"),
    ],
)
def test_unknown_keys_are_rejected_with_the_closest_known_key(tmp_path, grid, path, suggestion):
    msg = error_of(tmp_path, grid)
    assert f": {path}: " in msg and f"did you mean {suggestion!r}" in msg, msg


def test_unknown_router_and_task_carry_the_registry_error(tmp_path):
    msg = error_of(tmp_path, with_(routers=["dense", "swich"]))
    assert ": routers[1].name: unknown router 'swich'. Did you mean 'switch'?" in msg
    msg = error_of(tmp_path, with_(task="toyy"))
    assert ": task: unknown task 'toyy'. Did you mean 'toy'?" in msg


def test_duplicate_labels_are_refused(tmp_path):
    msg = error_of(tmp_path, with_(routers=["switch", {"name": "switch", "args": {"jitter": 0.0}, "label": "switch"}]))
    assert "routers[1].label: label 'switch' is already used by routers[0]" in msg


def test_shipped_grid_names_resolve_and_unknown_names_are_explained():
    assert schema.resolve_path("toy") == schema.GRIDS_DIR / "toy.yaml"
    with pytest.raises(GridError, match="Did you mean 'toy'"):
        schema.resolve_path("tyo")


def test_every_shipped_grid_validates():
    for name in schema.shipped_grids():
        g = schema.load(name, allow_placeholders=True)  # placeholders: tests/test_placeholders.py
        assert g["name"] and g["routers"] and g["tasks"], name


# -- expansion -----------------------------------------------------------------------------------------
def test_expansion_is_deterministic_and_run_ids_stable_under_key_order(tmp_path):
    a = expand_mod.expand(write(tmp_path, BASE, "a.yaml"))
    reordered = dict(reversed(list(copy.deepcopy(BASE).items())))
    reordered["moe"] = dict(reversed(list(reordered["moe"].items())))
    b = expand_mod.expand(write(tmp_path, reordered, "b.yaml"))
    assert a == b
    ids = [run_id(s) for s in a]
    assert ids == [run_id(s) for s in expand_mod.expand(write(tmp_path, BASE, "a.yaml"))]
    assert len(set(ids)) == len(ids) == 5 * 2
    # order: router entry, then seed
    assert [(s["label"], s["seed"]) for s in a[:4]] == [
        ("dense", 0),
        ("dense", 1),
        ("softmax-topk", 0),
        ("softmax-topk", 1),
    ]
    # a changed budget is a different run
    c = expand_mod.expand(write(tmp_path, with_(train__steps=5), "c.yaml"))
    assert not set(ids) & {run_id(s) for s in c}


def test_sweep_is_a_product_and_the_dense_baseline_is_not_repeated(tmp_path):
    grid = with_(
        seeds=[0],
        routers=["dense", "softmax-topk", "uniform"],
        sweep={"moe.num_experts": [4, 8], "train.lr": [0.001, 0.003]},
    )
    specs = expand_mod.expand(write(tmp_path, grid))
    moe = [s for s in specs if s["moe"]]
    assert sorted((s["label"], s["moe"]["num_experts"], s["train"]["lr"]) for s in moe) == sorted(
        (r, e, lr) for r in ("softmax-topk", "uniform") for e in (4, 8) for lr in (0.001, 0.003)
    )
    dense = [s for s in specs if s["moe"] is None]
    assert sorted(s["train"]["lr"] for s in dense) == [0.001, 0.003]  # the moe axis does not apply to it
    assert all("moe.num_experts" not in s["sweep"] for s in dense)
    assert all(set(s["sweep"]) == {"moe.num_experts", "train.lr"} for s in moe)


def test_router_args_axis_and_explicit_args_conflict(tmp_path):
    grid = with_(routers=["softmax-topk", "uniform"], sweep={"router_args.top_k": [1, 2]})
    specs = expand_mod.expand(write(tmp_path, grid))
    assert sorted((s["label"], s["moe"]["router_args"]["top_k"], s["moe"]["d_hidden"]) for s in specs) == sorted(
        (r, k, 64 // k) for r in ("softmax-topk", "uniform") for k in (1, 2) for _ in (0, 1)
    )
    msg = error_of(
        tmp_path, with_(routers=[{"name": "softmax-topk", "args": {"top_k": 1}}], sweep={"router_args.top_k": [1, 2]})
    )
    assert "routers[0].args.top_k: also swept by sweep.router_args.top_k" in msg


def test_a_preset_fills_in_what_the_grid_leaves_out(tmp_path):
    from moebench.tasks.toy import PRESETS

    grid = {
        "name": "p",
        "task": "toy",
        "preset": "tiny",
        "train": {"steps": 7},
        "routers": ["softmax-topk"],
        "moe": {"blocks": [-1], "d_hidden": 32},
    }
    (spec,) = expand_mod.expand(write(tmp_path, grid))
    tiny = PRESETS["tiny"]
    assert spec["task_args"] == tiny.task_args
    assert spec["moe"]["num_experts"] == tiny.moe["num_experts"]
    assert spec["train"]["steps"] == 7 and spec["train"]["batch_size"] == tiny.train["batch_size"]
    msg = error_of(tmp_path, {**grid, "preset": "huge"})
    assert ": preset: task 'toy' has no size 'huge'" in msg


# -- matching ------------------------------------------------------------------------------------------
def test_active_flop_matching_gives_top1_experts_twice_the_width(tmp_path):
    specs = expand_mod.expand(write(tmp_path, BASE))
    width = {s["label"]: s["moe"]["d_hidden"] for s in specs if s["moe"]}
    assert width == {"softmax-topk": 32, "switch": 64, "expert-choice": 32, "top1": 64}
    moe = [s for s in specs if s["moe"]]
    flops = {s["match"]["expert_flops_per_token"] for s in moe}
    assert flops == {2 * 4 * 32 * 32}  # k * (2 matmuls * 2 FLOPs) * d_model * width, the same for all
    for s in moe:
        m = s["match"]
        assert m["mode"] == "active_flops"
        assert m["reference"] == {"router": "softmax-topk", "active_experts": 2.0, "d_hidden": 32}
        assert Fraction(m["active_experts_per_token"]) * m["d_hidden"] == 64
        assert m["router_flops_per_token"] == 2 * 32 * 4  # a linear gate: reported, not matched
    dense = [s for s in specs if s["moe"] is None]
    assert dense and all("own MLP width" in s["match"]["dense"] for s in dense)


def test_expert_choice_capacity_counts_as_its_active_experts(tmp_path):
    grid = with_(
        routers=[
            {"name": "expert-choice", "label": "ec1", "args": {"capacity": 1}},
            {"name": "expert-choice", "label": "ec4", "args": {"capacity": 4}},
        ]
    )
    width = {s["label"]: s["moe"]["d_hidden"] for s in expand_mod.expand(write(tmp_path, grid))}
    assert width == {"ec1": 64, "ec4": 16}


def test_unmatchable_grid_is_refused_with_the_reason_and_working_widths(tmp_path):
    grid = with_(routers=["softmax-topk", "switch", {"name": "expert-choice", "label": "ec3", "args": {"capacity": 3}}])
    msg = error_of(tmp_path, grid)
    assert ": moe.d_hidden: cannot match run 'ec3'" in msg
    assert "runs 3 experts per token" in msg and "not an integer multiple of 4" in msg
    assert "one of 24, 36, 48" in msg  # each works for top-2 (x1), switch (x2) and ec3 (x2/3)
    fixed = copy.deepcopy(grid)
    fixed["moe"]["d_hidden"] = 36
    widths = {s["label"]: s["moe"]["d_hidden"] for s in expand_mod.expand(write(tmp_path, fixed))}
    assert widths == {"softmax-topk": 36, "switch": 72, "ec3": 24}
    # match: none takes the widths as given
    loose = {s["label"]: s["moe"]["d_hidden"] for s in expand_mod.expand(write(tmp_path, {**grid, "match": "none"}))}
    assert loose == {"softmax-topk": 32, "switch": 32, "ec3": 32}


def test_upcycling_with_unequal_matched_widths_is_refused(tmp_path):
    msg = error_of(tmp_path, with_(moe={"blocks": [-1], "num_experts": 4, "d_hidden": None, "upcycle": True}))
    assert ": moe.upcycle: " in msg and "widths [64, 128]" in msg


def test_null_width_means_the_dense_mlp_width(tmp_path):
    grid = with_(routers=["softmax-topk"], moe={"blocks": [-1], "num_experts": 4, "d_hidden": None})
    (spec, _) = expand_mod.expand(write(tmp_path, grid))
    assert spec["moe"]["d_hidden"] == 64  # the toy model's dim 32 x mlp_ratio 2


def test_parameter_matching_keeps_experts_times_width(tmp_path):
    grid = with_(match="params", seeds=[0], routers=["softmax-topk"], sweep={"moe.num_experts": [2, 4, 8]})
    specs = expand_mod.expand(write(tmp_path, grid))
    assert {s["moe"]["num_experts"]: s["moe"]["d_hidden"] for s in specs} == {2: 64, 4: 32, 8: 16}
    assert all(s["match"]["reference"] == {"num_experts": 4, "d_hidden": 32} for s in specs)


def test_router_width_override_is_refused_under_matching(tmp_path):
    msg = error_of(tmp_path, with_(routers=[{"name": "switch", "moe": {"d_hidden": 8}}]))
    assert ": routers[0].moe.d_hidden: with match: active_flops the width is set by matching" in msg


# -- grid show -----------------------------------------------------------------------------------------
def test_grid_show_prints_one_row_per_run_with_costs(tmp_path, capsys):
    path = write(tmp_path, with_(seeds=[0], sweep={"moe.num_experts": [4, 8]}))
    assert main(["grid", "show", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "9 runs, match: active_flops" in lines[0]  # dense once + 4 routers x 2 sweep values
    head = lines[1].split()
    assert head == [
        "run_id",
        "task",
        "label",
        "seed",
        "moe.num_experts",
        "d_hidden",
        "flops/tok",
        "mlp_flops/tok",
        "router_flops/tok",
        "params",
        "active_params",
    ]
    rows = {r.split()[0]: r.split() for r in lines[3:12]}
    for spec in expand_mod.expand(path):
        row = rows[run_id(spec)]
        assert row[2] == spec["label"]
    switch8 = next(r for r in rows.values() if r[2] == "switch" and r[4] == "8")
    assert switch8[5] == "64" and switch8[7] == "8.7k"  # 1 x 4 x 32 x 64 expert + 2 x 32 x 8 router FLOPs
    dense = next(r for r in rows.values() if r[2] == "dense")
    assert dense[4:7] + dense[8:10] == ["-", "64", "(dense)", "8.19k", "0"]  # its own MLP: 2 x 2 x 32 x 64, no router


def test_grid_show_reports_errors_without_a_traceback(tmp_path, capsys):
    path = write(tmp_path, with_(routers=["swich"]))
    assert main(["grid", "show", str(path)]) == 2
    assert "routers[0].name: unknown router 'swich'" in capsys.readouterr().err


CLOSING_ROUTERS = {"dense", "softmax-topk", "switch", "hash-position", "hash-lsh", "random", "ermoe"}
ADAPTER_TRACK = {"emoe-adapter", "softmax-topk-adapter"}
PARAM_CONTROLS = {"hash-position-params", "switch-params"}


def test_quick_is_the_pretrained_regime_with_three_seeds_on_the_three_tasks():
    specs, pretrains = expand_mod.expand_with_pretrain("quick")
    assert {s["task"] for s in specs} == {"classification", "retrieval", "brain-age"}
    for task in ("classification", "retrieval", "brain-age"):
        mine = [s for s in specs if s["task"] == task]
        assert {s["label"] for s in mine} == CLOSING_ROUTERS | ADAPTER_TRACK, task
        assert {s["seed"] for s in mine} == {0, 1, 2}
        pre = {p["seed"]: p for p in pretrains if p["task"] == task}
        assert sorted(pre) == [0, 1, 2]  # one dense pretrain per seed, shared by every router
        for s in mine:  # dense too: the pretrained model fine-tuned for the same budget
            assert s["model"]["pretrained"] == reference(pre[s["seed"]]) == f"pretrain:{run_id(pre[s['seed']])}"
            if s["label"] in ADAPTER_TRACK:  # frozen backbone + top-1 adapters of one width
                assert s["moe"]["mode"] == "adapter" and s["moe"]["freeze_backbone"] and s["moe"]["d_hidden"] == 64
            else:
                assert s["moe"] is None or (s["moe"]["upcycle"] and s["moe"]["d_hidden"] == 256)
        assert len({s["train"]["steps"] for s in mine}) == 1
        assert all(p["moe"] is None for p in pre.values())


def test_quick_all_has_every_router_and_shares_quicks_pretraining():
    from moebench.core.registry import ROUTERS

    specs, pretrains = expand_mod.expand_with_pretrain("quick-all")
    # oracle needs a task that knows the true groups and collapse is planted: both live in the structure
    # grid; the random control runs everywhere
    controls = {n for n in ROUTERS.builtin_names() if getattr(ROUTERS.get(n), "control", False)} - {"random"}
    layer_routers = (
        set(ROUTERS.builtin_names()) - {"soft-moe", "ermoe-released"} - controls
    )  # quick-all.yaml's footnote
    assert {s["moe"]["router"] if s["moe"] else "dense" for s in specs} == layer_routers | {"dense"}
    _, quick = expand_mod.expand_with_pretrain("quick")
    assert sorted(run_id(p) for p in pretrains) == sorted(run_id(p) for p in quick)
    thr = next(s for s in specs if s["label"] == "ermoe-ext-threshold")
    assert thr["moe"]["router_args"]["free_experts"] and thr["moe"]["router_args"]["threshold"] > 0


def test_quick_scratch_is_flop_matched_from_random_weights_with_the_same_eval_sets():
    specs = expand_mod.expand("quick-scratch")
    quick = expand_mod.expand("quick")
    for task in ("classification", "retrieval", "brain-age"):
        mine = [s for s in specs if s["task"] == task]
        assert {s["label"] for s in mine} == CLOSING_ROUTERS | {"emoe"} | PARAM_CONTROLS
        assert {s["seed"] for s in mine} == {0, 1, 2}
        assert all("pretrained" not in s["model"] for s in mine)
        # FLOP-matched within the task: one expert FLOP count for every MoE run but the parameter controls
        matched = [s for s in mine if s["moe"] and s["label"] not in PARAM_CONTROLS]
        assert len({s["match"]["expert_flops_per_token"] for s in matched}) == 1, task
        ref = next(s for s in mine if s["label"] == "softmax-topk" and s["seed"] == 0)
        for label in PARAM_CONTROLS:  # same total expert parameters as the reference, not the same FLOPs
            ctl = next(s for s in mine if s["label"] == label and s["seed"] == 0)
            assert ctl["match"]["mode"] == "params"
            assert ctl["match"]["expert_params"] == ref["match"]["expert_params"], (task, label)
        theirs = next(s for s in quick if s["task"] == task)
        assert mine[0]["task_args"] == theirs["task_args"]  # the same eval sets in both regimes


@pytest.mark.parametrize(
    "name", ["emoe-cifar100", "emoe-imagenet", "ermoe-cifar10", "quick-adapter", "retrieval-coco-flickr-adapter"]
)
def test_adapter_and_paper_protocol_grids_expand_once_their_paths_are_set(name):
    """The EMoE / released-ERMoE protocol grids: placeholders refused, then (with every path given by
    --set) every run expands with the adapter / released-method settings their headers state."""
    path = schema.resolve_path(name)
    found = schema.placeholders(yaml.safe_load(path.read_text()))
    sets = [f"{schema._shell_key(k)}=/data/{i}" for i, (k, _) in enumerate(found)]
    specs = expand_mod.expand(schema.load(name, overrides=sets))
    moes = [s["moe"] for s in specs if s["moe"]]
    assert moes and len({s["seed"] for s in specs}) >= 3
    if name.startswith("ermoe"):
        assert {m["router"] for m in moes} == {"ermoe-released"} and {m["num_experts"] for m in moes} == {8}
    else:
        assert all(m["mode"] == "adapter" and m["freeze_backbone"] and m["patches_only"] for m in moes)
        assert "emoe" in {m["router"] for m in moes}
