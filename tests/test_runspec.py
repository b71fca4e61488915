"""The typed run spec: frozen, resolved once, its run id the one the spec dict always had."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from pathlib import Path

import pytest
import yaml

from moebench.training.spec import RunSpec, SpecError, canonical_json, resolve_spec, run_id

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(ROOT.glob("results/*/*/spec.yaml"))


def _old_run_id(spec: dict) -> str:
    """The run id as it was computed before `RunSpec`: from the resolved dict."""
    s = resolve_spec(spec)
    return f"{s['label']}-s{s['seed']}-{hashlib.sha256(canonical_json(s).encode()).hexdigest()[:10]}"


def _toy() -> RunSpec:
    return RunSpec.from_dict({"task": "toy", "moe": {"blocks": "all", "num_experts": 4, "router": "switch"}})


def test_a_run_spec_is_frozen_down_to_its_sections():
    spec = _toy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.train["lr"] = 1.0  # type: ignore[index]
    with pytest.raises(TypeError):
        spec.moe["router_args"]["top_k"] = 2  # type: ignore[index]
    copy = spec["moe"]  # the dict view is a fresh plain copy: changing it changes nothing
    copy["num_experts"] = 8
    assert spec.moe["num_experts"] == 4 and spec.run_id == run_id(spec.to_dict())


def test_round_trip_and_pickle_keep_the_spec_and_its_id():
    spec = _toy()
    assert RunSpec.from_dict(spec.to_dict()) == spec
    assert dict(spec) == spec.to_dict() == resolve_spec(spec.to_dict())
    assert pickle.loads(pickle.dumps(spec)) == spec  # what submitit sends to a job
    assert hash(spec) == hash(RunSpec.from_dict(spec.to_dict()))
    assert yaml.safe_load(yaml.safe_dump(spec.to_dict())) == spec.to_dict()
    assert spec.label == "switch" and spec.router == "switch" and spec.train["steps"] > 0


def test_a_bad_spec_is_refused_naming_the_field():
    with pytest.raises(SpecError, match="unknown top-level spec key"):
        RunSpec.from_dict({"task": "toy", "learning_rate": 1})
    with pytest.raises(SpecError, match="task is required"):
        RunSpec.from_dict({"seed": 1})
    with pytest.raises(SpecError, match="train.lr"):
        RunSpec.from_dict({"task": "toy", "train": {"lr": "fast"}})
    with pytest.raises(SpecError, match="must be a mapping"):
        RunSpec.from_dict(["toy"])  # type: ignore[arg-type]


@pytest.mark.skipif(not COMMITTED, reason="no committed sample under results/")
def test_every_committed_run_id_is_the_one_the_spec_dict_had():
    wrong = []
    for path in COMMITTED:
        d = yaml.safe_load(path.read_text())
        spec = RunSpec.from_dict(d)
        if not (spec.run_id == _old_run_id(d) == run_id(d) == path.parent.name and spec.to_dict() == resolve_spec(d)):
            wrong.append(f"{path.parent.name}: {spec.run_id}")
    assert not wrong, wrong


def test_expansion_gives_run_specs_without_hidden_keys():
    from moebench.grids.expand import expand_with_pretrain

    specs, pretrains = expand_with_pretrain("quick")
    assert all(isinstance(s, RunSpec) for s in specs) and all(isinstance(p, RunSpec) for p in pretrains)
    assert not [k for s in specs for k in s.to_dict() if k.startswith("_")]
    assert len({s.run_id for s in specs}) == len(specs)


def test_the_launcher_plans_frozen_runs_and_changes_them_by_copy(tmp_path):
    from moebench.grids.cancel import cancel
    from moebench.grids.phase import plan
    from moebench.grids.planned import PlannedRun
    from moebench.grids.pretrain import hold_back

    spec = RunSpec.from_dict({"task": "toy", "model": {"pretrained": "pretrain:pretrain-s0-0123456789"}})
    (r,) = plan([spec.to_dict()], tmp_path)
    assert isinstance(r, PlannedRun) and r.spec == spec and r.run_id == spec.run_id
    assert (r.action, r.why, r.state, r.outcome) == ("run", "new", "new", None)
    assert r.run_dir == tmp_path / "single" / spec.run_id and r.pretrain == "pretrain:pretrain-s0-0123456789"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.action = "skip"  # type: ignore[misc]
    (held,) = hold_back([r], {r.pretrain: "its dense pretrain is failed"})
    assert (held.action, held.why) == ("skip", "waits: its dense pretrain is failed") and r.action == "run"
    assert cancel(tmp_path).stopped == 0  # nothing trains there
