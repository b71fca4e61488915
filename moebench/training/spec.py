"""The run spec: one plain dict per run (written as ``spec.yaml``), its defaults, validation and id.

The grid produces specs, the runner consumes them; both go through `resolve_spec`, so a spec spelled
with or without its defaults names the same run and gets the same `run_id`.

Schema (all keys; missing ones take the defaults below)::

    grid: str            results/<grid>/<run_id>/ ; "single" for `moebench train`
    task: str            registered task name
    task_args: dict      Task(**task_args)
    model: dict          task.build_model(model, moe); {} = the task's default_model
    moe: null | {blocks, num_experts, router, router_args, d_hidden, capacity_factor, upcycle}
                         null = the dense baseline
    label: str           display name ("ermoe-context", "dense"); default: the router name or "dense"
    seed: int
    train: {steps, batch_size, lr, weight_decay, warmup_steps, eval_every, grad_clip, amp,
            checkpoint_every, max_loss, num_workers, eval_batch_size, probe_size, keep_checkpoint,
            deterministic}
    sweep: dict          axis -> value (informational)
    match: dict          what the grid matched (informational)
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import Any

import yaml

TOP_LEVEL = ("grid", "task", "task_args", "model", "moe", "label", "seed", "train", "sweep", "match")

DEFAULT_TRAIN: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 50,
    "eval_every": 200,          # 0: evaluate only at the end
    "grad_clip": 1.0,           # 0 or null: no clipping
    "amp": "auto",              # auto | true | false; bf16 autocast, used on CUDA only
    "checkpoint_every": 200,    # 0: checkpoint only at evaluations
    "max_loss": 1e6,            # loss above this (or NaN / inf) fails the run; null: only NaN / inf
    "num_workers": 0,
    "eval_batch_size": None,    # null: batch_size
    "probe_size": 64,           # eval samples whose top-1 experts are tracked for stability; 0: off
    "keep_checkpoint": False,   # keep checkpoint.pt after the run is done
    "deterministic": "auto",    # auto (CPU only) | true | false: deterministic kernels; on CUDA they
                                # make reruns and resumes bit-identical at some speed cost
}

DEFAULT_MOE: dict[str, Any] = {
    "blocks": "all",            # which blocks become MoE (moebench.core.moefy's `blocks`): "all" or
                                # a list of block indices (negative from the end, e.g. [-2, -1])
    "num_experts": 8,
    "router": "softmax-topk",
    "router_args": {},
    "d_hidden": None,           # null: the dense MLP's hidden width
    "capacity_factor": None,    # null: the router's default (dropless for most)
    "upcycle": False,
}

# Names other modules may use for the same tables.
TRAIN_DEFAULTS = DEFAULT_TRAIN
MOE_DEFAULTS = DEFAULT_MOE

DEFAULTS: dict[str, Any] = {
    "grid": "single",
    "task_args": {},
    "model": {},
    "moe": None,
    "seed": 0,
    "sweep": {},
    "match": {},
}

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


class SpecError(ValueError):
    """A run spec that cannot run; the message names the field and the fix."""


# ----------------------------------------------------------------------------------------------------
# field checks

def _int(value, field: str, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise SpecError(f"spec field {field} must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise SpecError(f"spec field {field} must be an integer, got {value!r}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise SpecError(f"spec field {field} must be an integer, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise SpecError(f"spec field {field} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"spec field {field} must be >= {minimum}, got {value}")
    return value


def _float(value, field: str, minimum: float | None = None, strict: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or value is None:
        raise SpecError(f"spec field {field} must be a number, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            value = float(value)
        except ValueError:
            raise SpecError(f"spec field {field} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise SpecError(f"spec field {field} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value:
        raise SpecError(f"spec field {field} must be a number, got NaN")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise SpecError(f"spec field {field} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def _bool(value, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
        return value.lower() in ("true", "yes")
    raise SpecError(f"spec field {field} must be true or false, got {value!r}")


def _dict(value, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"spec field {field} must be a mapping (YAML dict), got {type(value).__name__} {value!r}")
    return copy.deepcopy(value)


def _name(value, field: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise SpecError(
            f"spec field {field} must be a non-empty name of letters, digits and . _ + = - "
            f"(it becomes part of a folder name), got {value!r}"
        )
    return value


def _unknown(keys, known, where: str) -> None:
    unknown = sorted(set(keys) - set(known))
    if unknown:
        import difflib

        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(known), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise SpecError(f"unknown {where} key(s) {', '.join(hints)}; known keys: {', '.join(known)}")


# ----------------------------------------------------------------------------------------------------
# resolution

def resolve_moe(moe) -> dict | None:
    if moe is None:
        return None
    if not isinstance(moe, dict):
        raise SpecError(f"spec field moe must be null (dense baseline) or a mapping, got {moe!r}")
    _unknown(moe, DEFAULT_MOE, "moe")
    m = {**copy.deepcopy(DEFAULT_MOE), **copy.deepcopy(moe)}
    blocks = m["blocks"]
    ok = isinstance(blocks, str) or (isinstance(blocks, int) and not isinstance(blocks, bool)) or (
        isinstance(blocks, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks)
    )
    if not ok:
        raise SpecError(f"spec field moe.blocks must be a string (e.g. 'all'), an int or a list of block indices, got {blocks!r}")
    m["num_experts"] = _int(m["num_experts"], "moe.num_experts", 1)
    if not isinstance(m["router"], str) or not m["router"]:
        raise SpecError(f"spec field moe.router must be a router name (see `moebench routers`), got {m['router']!r}")
    m["router_args"] = _dict(m["router_args"], "moe.router_args")
    if m["d_hidden"] is not None:
        m["d_hidden"] = _int(m["d_hidden"], "moe.d_hidden", 1)
    m["capacity_factor"] = _float(m["capacity_factor"], "moe.capacity_factor", 0.0, strict=True, allow_none=True)
    m["upcycle"] = _bool(m["upcycle"], "moe.upcycle")
    return m


def resolve_train(train) -> dict:
    train = _dict(train, "train")
    _unknown(train, DEFAULT_TRAIN, "train")
    t = {**DEFAULT_TRAIN, **train}
    t["steps"] = _int(t["steps"], "train.steps", 1)
    t["batch_size"] = _int(t["batch_size"], "train.batch_size", 1)
    t["lr"] = _float(t["lr"], "train.lr", 0.0, strict=True)
    t["weight_decay"] = _float(t["weight_decay"], "train.weight_decay", 0.0)
    t["warmup_steps"] = _int(t["warmup_steps"], "train.warmup_steps", 0)
    t["eval_every"] = _int(t["eval_every"], "train.eval_every", 0)
    t["grad_clip"] = _float(t["grad_clip"] if t["grad_clip"] is not None else 0.0, "train.grad_clip", 0.0)
    amp = t["amp"]
    if isinstance(amp, str) and amp.lower() in ("true", "false"):
        amp = amp.lower() == "true"
    if amp not in ("auto", True, False):
        raise SpecError(f"spec field train.amp must be auto, true or false, got {t['amp']!r}")
    t["amp"] = amp
    t["checkpoint_every"] = _int(t["checkpoint_every"], "train.checkpoint_every", 0)
    t["max_loss"] = _float(t["max_loss"], "train.max_loss", 0.0, strict=True, allow_none=True)
    t["num_workers"] = _int(t["num_workers"], "train.num_workers", 0)
    t["eval_batch_size"] = _int(t["eval_batch_size"] if t["eval_batch_size"] is not None else t["batch_size"],
                                "train.eval_batch_size", 1)
    t["probe_size"] = _int(t["probe_size"], "train.probe_size", 0)
    t["keep_checkpoint"] = _bool(t["keep_checkpoint"], "train.keep_checkpoint")
    det = t["deterministic"]
    if det != "auto":
        det = _bool(det, "train.deterministic (auto, true or false)")
    t["deterministic"] = det
    return t


def resolve_spec(spec: dict) -> dict:
    """A validated copy of ``spec`` with every default filled in (raises `SpecError` naming the field)."""
    if not isinstance(spec, dict):
        raise SpecError(f"a run spec must be a mapping, got {type(spec).__name__}")
    _unknown(spec, TOP_LEVEL, "top-level spec")
    if "task" not in spec:
        raise SpecError("spec field task is required: the registered task name (see `moebench tasks`)")
    s = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(spec)}
    s["grid"] = _name(s["grid"], "grid")
    if not isinstance(s["task"], str) or not s["task"]:
        raise SpecError(f"spec field task must be a task name (see `moebench tasks`), got {s['task']!r}")
    s["task_args"] = _dict(s["task_args"], "task_args")
    s["model"] = _dict(s["model"], "model")
    s["moe"] = resolve_moe(s["moe"])
    if s.get("label") is None:
        s["label"] = "dense" if s["moe"] is None else s["moe"]["router"]
    s["label"] = _name(s["label"], "label")
    s["seed"] = _int(s["seed"], "seed", 0)
    s["train"] = resolve_train(s.get("train"))
    s["sweep"] = _dict(s["sweep"], "sweep")
    s["match"] = _dict(s["match"], "match")
    try:
        canonical_json(s)
    except (TypeError, ValueError) as err:
        raise SpecError(f"spec must contain only plain YAML values (str, number, bool, null, list, dict): {err}") from err
    return s


def canonical_json(spec: dict) -> str:
    """Sorted-key, whitespace-free JSON of ``spec`` without ``grid`` (the part that affects results)."""
    body = {k: v for k, v in spec.items() if k != "grid"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)


def run_id(spec: dict) -> str:
    """``{label}-s{seed}-{hash}``: hash = first 10 hex digits of sha256 of the canonical JSON of the
    resolved spec minus ``grid`` (so the same run in two grids has the same id)."""
    s = resolve_spec(spec)
    digest = hashlib.sha256(canonical_json(s).encode("utf-8")).hexdigest()[:10]
    return f"{s['label']}-s{s['seed']}-{digest}"


# ----------------------------------------------------------------------------------------------------
# overrides (`moebench train --set key.path=value`)

def parse_value(text: str):
    """A YAML value, with numbers YAML 1.1 leaves as strings ("3e-4") read as floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"cannot parse value {text!r} as YAML: {err}") from err
    if isinstance(value, str):
        try:
            return float(value) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value) else value
        except ValueError:
            return value
    return value


def apply_override(spec: dict, assignment: str) -> dict:
    """Set ``key.path=value`` in ``spec`` in place (value parsed as YAML) and return it."""
    if "=" not in assignment:
        raise SpecError(f"override {assignment!r} must look like key.path=value, e.g. train.lr=3e-4")
    path, text = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not keys or any(not k for k in keys):
        raise SpecError(f"override {assignment!r}: empty key in {path!r}")
    if keys[0] not in TOP_LEVEL:
        import difflib

        close = difflib.get_close_matches(keys[0], TOP_LEVEL, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"override {assignment!r}: unknown top-level key {keys[0]!r}{hint}; known: {', '.join(TOP_LEVEL)}")
    node = spec
    for i, k in enumerate(keys[:-1]):
        if node.get(k) is None:
            if k == "moe" and i == 0:
                raise SpecError(
                    f"override {assignment!r}: moe is null (the dense baseline); pick a router "
                    f"(--router NAME) before setting moe options"
                )
            node[k] = {}
        if not isinstance(node[k], dict):
            raise SpecError(f"override {assignment!r}: {'.'.join(keys[: i + 1])} is {node[k]!r}, not a mapping")
        node = node[k]
    node[keys[-1]] = parse_value(text)
    return spec
