"""Where a dense pretraining run's weights live, and how a dependent run names them.

A run that starts from a grid's dense pretrain says so in its spec as ``model.pretrained:
"pretrain:<run id>"``: the pretraining run's id, not a path, so the run id of the dependent run does
not depend on where the results folder lives (``--results results`` and ``--results /abs/results``
give the same ids, and a moved results folder keeps them). The runner resolves the reference to
``<results>/.pretrain/pretrain/<run id>/weights.pt`` when the run starts (`with_weights_path`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

from moebench.training.rundir import run_path

PRETRAIN_DIR = ".pretrain"  # under the results root, shared by every grid there
PRETRAIN_GRID = "pretrain"  # the pretraining runs' `grid`: folders <results>/.pretrain/pretrain/<run_id>/
WEIGHTS = "weights.pt"
REF_PREFIX = "pretrain:"  # model.pretrained: "pretrain:<run id>"


def pretrain_ref(pretrain_run_id: str) -> str:
    """The value of a dependent run's ``model.pretrained``: its dense pretrain's run id."""
    return f"{REF_PREFIX}{pretrain_run_id}"


def is_pretrain_ref(value) -> bool:
    return isinstance(value, str) and value.startswith(REF_PREFIX)


def pretrain_root(results) -> Path:
    return Path(results) / PRETRAIN_DIR


def weights_of(results, ref: str) -> str:
    """The weights file a ``pretrain:<run id>`` reference names under ``results`` (spelled as ``results`` is)."""
    if not is_pretrain_ref(ref):
        raise ValueError(f"not a pretrain reference (want {REF_PREFIX}<run id>): {ref!r}")
    return os.fspath(run_path(pretrain_root(results), PRETRAIN_GRID, ref[len(REF_PREFIX) :]) / WEIGHTS)


def with_weights_path(spec: Mapping, results) -> dict:
    """``spec`` (a dict or a `RunSpec`) with a ``pretrain:<run id>`` model.pretrained replaced by its
    weights file under ``results`` (a copy; ``spec`` itself, and so its run id, is unchanged). Other
    specs come back as they are (a `RunSpec` as its plain dict)."""
    model = spec.get("model") or {}
    if not is_pretrain_ref(model.get("pretrained")):
        return spec if isinstance(spec, dict) else dict(spec)
    if results is None:
        raise ValueError(
            f"model.pretrained is {model['pretrained']!r} (a grid's dense pretrain), which is found "
            f"under a results folder; run the spec through moebench.training.runner.execute or "
            f"`moebench train --results RESULTS`"
        )
    out = {k: copy.deepcopy(v) for k, v in spec.items()}  # a plain dict, from a dict or a RunSpec
    out["model"]["pretrained"] = weights_of(results, model["pretrained"])
    return out
