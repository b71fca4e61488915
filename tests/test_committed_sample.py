"""The committed sample (results/quick): every run id recomputes from its spec, and a fresh clone's
`moebench run --dry-run` plans nothing (no pretrain either: every run that needs one is done)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moebench.training.pretrained import is_pretrain_ref
from moebench.training.spec import run_id

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "results" / "quick"
RUNS = sorted(p for p in SAMPLE.glob("*/spec.yaml")) if SAMPLE.is_dir() else []

pytestmark = pytest.mark.skipif(not RUNS, reason="no committed sample under results/quick")


def _spec(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_every_committed_run_id_recomputes_from_its_spec():
    wrong = [f"{p.parent.name}: {run_id(_spec(p))}" for p in RUNS if run_id(_spec(p)) != p.parent.name]
    assert not wrong, "folder name != run id of its spec.yaml:\n" + "\n".join(wrong)


def test_a_fresh_clone_plans_nothing_for_the_committed_sample(tmp_path):
    pretrained = [_spec(p)["model"].get("pretrained") for p in RUNS]
    if any(isinstance(w, str) and not is_pretrain_ref(w) for w in pretrained):
        pytest.skip(
            "the committed sample predates pretrain references (model.pretrained is a path): "
            "regenerate it with `moebench run` so its run ids are the new ones"
        )
    from moebench.grids import launch

    lines: list[str] = []
    out = launch.run_grid("quick", cluster="debug", results=SAMPLE.parent, dry_run=True, log=lines.append)
    assert out["counts"].get("done") == len(out["runs"]) == len(RUNS), lines
    assert not any("would" in line or line.startswith("pretrain:") for line in lines), lines
