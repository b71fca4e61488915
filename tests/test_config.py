"""The grid validator and the spec resolver read one schema: they accept the same keys and bounds."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from moebench.core.config import MoEConfig, TrainConfig, fields_of
from moebench.grids import schema
from moebench.grids.expand import expand
from moebench.grids.schema import GridError
from moebench.training.spec import DEFAULT_MOE, DEFAULT_TRAIN, SpecError, resolve_spec

BASE_GRID = {
    "name": "g",
    "task": "toy",
    "preset": "tiny",
    "seeds": [0],
    "routers": ["softmax-topk"],
    "moe": {"blocks": [-1], "d_hidden": 32},
}
BASE_SPEC = {"task": "toy", "moe": {"router": "softmax-topk", "num_experts": 4}}


def _grid_accepts(tmp_path, section: str, key: str, value) -> bool:
    g = {**BASE_GRID, section: {**BASE_GRID.get(section, {}), key: value}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(g))
    try:
        expand(path)
    except GridError:
        return False
    return True


def _spec_accepts(section: str, key: str, value) -> bool:
    spec = {**BASE_SPEC, section: {**BASE_SPEC.get(section, {}), key: value}}
    try:
        resolve_spec(spec)
    except SpecError:
        return False
    return True


def test_the_grid_and_the_spec_know_the_same_keys():
    assert set(schema.TRAIN_KEYS) == set(DEFAULT_TRAIN) == set(fields_of(TrainConfig))
    assert set(schema.MOE_KEYS) | {"router", "router_args"} == set(DEFAULT_MOE) == set(fields_of(MoEConfig))


# One valid and one invalid value per bounded key; both readers must agree on each.
PROBES = [
    ("train", f.name, v)
    for f in dataclasses.fields(TrainConfig)
    for v in {
        "int": [0, 1, -1, 2.5],
        "float": [0.0, -0.1, 1e-3],
        "bool": [True, "maybe"],
        "choice": ["auto", True, "sometimes"],
        "list": [["tensorboard"], ["wandb", "tensorboard"], ["bogus"], ["wandb", "wandb"], "wandb"],
    }[f.metadata["kind"]]
]
PROBES += [
    ("moe", k, v)
    for k, vals in {
        "num_experts": [0, 4, 10**9],
        "capacity_factor": [0, 1.5, -1],
        "upcycle": [True, 3],
        "d_hidden": [None, 0, 16],
    }.items()
    for v in vals
]


@pytest.mark.parametrize("section,key,value", PROBES)
def test_the_grid_and_the_spec_accept_exactly_the_same_values(tmp_path, section, key, value):
    if section == "moe" and key == "d_hidden":
        pytest.skip("d_hidden is set by matching in a grid (checked by test_grid)")
    assert _grid_accepts(tmp_path, section, key, value) == _spec_accepts(section, key, value), (key, value)


def test_errors_name_the_key_in_both_readers(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**BASE_GRID, "train": {"weight_decay": -0.1}}))
    with pytest.raises(GridError, match=r"g.yaml: train.weight_decay: expected a number >= 0, got -0.1"):
        schema.load(path)
    with pytest.raises(SpecError, match=r"spec field train.weight_decay must be a number >= 0, got -0.1"):
        resolve_spec({**BASE_SPEC, "train": {"weight_decay": -0.1}})
    path.write_text(yaml.safe_dump({**BASE_GRID, "train": {"deterministic": True}}))
    assert schema.load(path)["train"]["deterministic"] is True  # a grid takes every spec key


def test_unknown_keys_say_the_closest_one_with_a_separator(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**BASE_GRID, "train": {"stpes": 3}}))
    with pytest.raises(GridError, match=r"unknown key 'stpes'; did you mean 'steps'\?\. Known keys here: steps,"):
        schema.load(path)


def test_huge_seeds_and_expert_counts_are_refused_by_the_right_field(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**BASE_GRID, "seeds": [10**23]}))
    with pytest.raises(GridError, match=r"seeds\[0\]: expected an integer >= 0 and <= 4294967295"):
        schema.load(path)
    path.write_text(yaml.safe_dump({**BASE_GRID, "moe": {"num_experts": 10**9}}))
    with pytest.raises(GridError, match=r": moe.num_experts: expected an integer >= 1 and <= 4096"):
        schema.load(path)
