"""Grid files: a YAML grid -> a deterministic list of fully resolved, matched run specs.

Why a grid: every comparison in a report must hold everything but the router fixed (task, model,
data, budget, seeds) and must give every run the same work per token. The grid states the fixed
parts once; ``expand`` multiplies them out and does the matching, so no one hand-edits widths.

Schema (every key optional unless marked; unknown keys are rejected with the closest known key)::

    name: quick                  # results/<name>/ ; default: the file's stem
    description: free text
    # one task ...
    task: toy                    # required unless `tasks` is given (a registered task)
    preset: tiny                 # optional: the task's named preset (Task.preset) fills in task_args,
                                 # model, moe and train; anything the grid file sets wins over it
    task_args: {...}             # the task's options (checked by the task itself)
    model: {...}                 # the task's model section; default: the task's default_model
    # ... or several, run as one grid (one results folder, one report that groups by task)
    tasks:
      - {task: classification, preset: quick, task_args: {...}, model: {...}, moe: {...}, train: {...}}
    moe:                         # MoE placement defaults, overridable per task block / router / sweep
      blocks: [-2, -1]           # which blocks become MoE: list of indices, 'all', 'last-N', 'every-N'
      num_experts: 8
      d_hidden: 192              # REFERENCE expert width (see matching below); null = the dense MLP's
      capacity_factor: null      # null = dropless (or the router's own default, e.g. Switch)
      upcycle: false             # copy the dense MLP into every expert
    train: {steps: ..., batch_size: ..., lr: ..., ...}   # budget, shared by all runs (moebench.spec)
    seeds: [0, 1]
    routers:                     # a name, or a mapping; `dense` = the model without MoE
      - dense
      - softmax-topk
      - {name: switch, label: switch-cf1.5, args: {...}, moe: {capacity_factor: 1.5}}
    sweep:                       # product over axes (dotted paths)
      moe.num_experts: [4, 8]    # moe.<key> | router_args.<key> | train.<key> | task_args.<..> | model.<..>
    match: active_flops          # active_flops (default) | params | none
                                 # or {mode: active_flops, reference_active_experts: 2}
    executor: {cluster: auto, partition: null, time_min: 60, cpus_per_task: 1, gpus_per_node: 0,
               mem_gb: null, array_parallelism: 64, max_workers: null, sbatch_extra: {}}

Precedence, most specific last: spec defaults < task preset < grid-level moe/train < task block's
moe/train < router entry's moe < sweep value.

Matching (what every run's ``spec['match']`` records):

- ``active_flops``: the reference is a top-k=2 softmax-topk layer at the grid's ``d_hidden``
  (``reference_active_experts`` changes the 2). A router that runs ``a`` experts per token on average
  (its ``active_experts_per_token``; expert-choice: its capacity) gets experts of width
  ``d_hidden * 2 / a``, so ``a * width`` -- and hence the expert FLOPs per token -- is the same for
  every MoE run: Switch (top-1) gets experts twice as wide as a top-2 router. Widths must come out
  as integers that are multiples of 4 (the grouped GEMM's alignment); otherwise the grid is refused,
  naming the run and the d_hidden values that would work. A router's own FLOPs (its score
  computation) are recorded (``router_flops_per_token``) but not matched: they are part of what a
  router costs.
- ``params``: total expert parameters are matched instead: ``num_experts * width`` is kept at the
  reference ``moe.num_experts * d_hidden`` (biases and router-specific extras, e.g. ERMoE's
  singular values, are reported, not matched).
- ``none``: every run uses the width it is given.
- The dense baseline keeps the model's own MLP width (it is "the model without MoE", the one a
  reader knows). It is FLOP-matched to the MoE runs exactly when that width equals
  ``reference_active_experts * d_hidden``; ``moebench grid show`` prints both so it is visible.
- ``upcycle: true`` copies the dense MLP into each expert, which needs every run's width to be the
  same; a grid whose matching would give different widths is refused.

Measuring: matching needs each MoE layer's d_model (and ``d_hidden: null`` the dense MLP width), so
``expand`` builds the task's model once per (task, task_args, model, blocks, num_experts), with tiny
experts and never loading weights. A task that reads its data to build (e.g. to count ImageNet's
classes) falls back to ``moebench.models.build_model`` on the model section, and ``grid show`` says so.
Order of the expanded runs: task block, sweep point (axes and values in file order), router entry,
seed; the dense baseline appears once per point of the axes that apply to it (train/task_args/model).
"""
from __future__ import annotations

import copy
import difflib
import functools
import itertools
import json
import os
import re
from fractions import Fraction
from pathlib import Path

import yaml

GRIDS_DIR = Path(__file__).resolve().parent / "grids"

TOP_KEYS = ("name", "description", "task", "preset", "task_args", "model", "tasks", "moe", "train", "seeds",
            "routers", "sweep", "match", "executor")
BLOCK_KEYS = ("task", "preset", "task_args", "model", "moe", "train")
MOE_KEYS = ("blocks", "num_experts", "d_hidden", "capacity_factor", "upcycle")
ROUTER_KEYS = ("name", "label", "args", "moe")
MATCH_KEYS = ("mode", "reference_active_experts")
MATCH_MODES = ("active_flops", "params", "none")
EXECUTOR_KEYS = ("cluster", "partition", "time_min", "cpus_per_task", "gpus_per_node", "mem_gb",
                 "array_parallelism", "max_workers", "sbatch_extra")
CLUSTERS = ("auto", "local", "slurm", "debug")
TRAIN_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "eval_every", "grad_clip",
              "amp", "checkpoint_every", "max_loss", "num_workers", "eval_batch_size", "probe_size",
              "keep_checkpoint")
SWEEP_PREFIXES = ("moe", "router_args", "train", "task_args", "model")
DENSE = "dense"
REFERENCE_ROUTER = "softmax-topk"
WIDTH_MULTIPLE = 4

EXECUTOR_DEFAULTS = {
    "cluster": "auto", "partition": None, "time_min": 60, "cpus_per_task": 1, "gpus_per_node": 0,
    "mem_gb": None, "array_parallelism": 64, "max_workers": None, "sbatch_extra": {},
}

# -- type checks -------------------------------------------------------------------------------------
_INT = ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
_POS_INT = ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
_NONNEG_INT = ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
_NUM = ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
_POS_NUM = ("a number > 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0)
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_STR = ("a string", lambda v: isinstance(v, str))
_MAP = ("a mapping", lambda v: isinstance(v, dict))


def _opt(check):
    return (check[0] + " or null", lambda v: v is None or check[1](v))


_BLOCKS = ("a list of block indices, an integer, or a string such as 'all'",
           lambda v: isinstance(v, str) or _INT[1](v) or (isinstance(v, list) and all(_INT[1](x) for x in v)))

MOE_TYPES = {"blocks": _BLOCKS, "num_experts": _POS_INT, "d_hidden": _opt(_POS_INT),
             "capacity_factor": _opt(_POS_NUM), "upcycle": _BOOL}
TRAIN_TYPES = {"steps": _POS_INT, "batch_size": _POS_INT, "lr": _POS_NUM, "weight_decay": _NUM,
               "warmup_steps": _NONNEG_INT, "eval_every": _NONNEG_INT,
               "grad_clip": _opt(("a number >= 0", lambda v: _NUM[1](v) and v >= 0)),
               "amp": ("auto, true or false", lambda v: v in ("auto", True, False)),
               "checkpoint_every": _NONNEG_INT, "max_loss": _opt(_POS_NUM), "num_workers": _NONNEG_INT,
               "eval_batch_size": _opt(_POS_INT), "probe_size": _NONNEG_INT, "keep_checkpoint": _BOOL}
_NUMERIC_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
EXECUTOR_TYPES = {"cluster": ("one of " + ", ".join(CLUSTERS), lambda v: v in CLUSTERS),
                  "partition": _opt(_STR), "time_min": _POS_NUM, "cpus_per_task": _POS_INT,
                  "gpus_per_node": _NONNEG_INT, "mem_gb": _opt(_POS_NUM), "array_parallelism": _POS_INT,
                  "max_workers": _opt(_POS_INT), "sbatch_extra": _MAP}


class GridError(ValueError):
    """A mistake in a grid file; the message names the file, the key path, what was expected, and the fix."""


def _tname(v) -> str:
    return "null" if v is None else type(v).__name__


class _Ctx:
    """Carries the file name so every error can name it."""

    def __init__(self, file: str):
        self.file = file

    def error(self, path: str, msg: str) -> GridError:
        return GridError(f"{self.file}: {path}: {msg}")

    def check(self, value, check, path: str, fix: str = "") -> None:
        what, ok = check
        if not ok(value):
            hint = f"; {fix}" if fix else ""
            raise self.error(path, f"expected {what}, got {value!r} ({_tname(value)}){hint}")

    def keys(self, mapping: dict, known, path: str) -> None:
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"{path}.{key}" if path else str(key)
                raise self.error(where, f"unknown key {key!r}{hint} Known keys here: {', '.join(known)}")

    def mapping(self, value, path: str) -> dict:
        if value is None:
            return {}
        self.check(value, _MAP, path)
        return value


# -- loading -----------------------------------------------------------------------------------------
def shipped_grids() -> list[str]:
    """Names of the grids shipped in ``moebench/grids/`` (usable as ``moebench run NAME``)."""
    return sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


def resolve_path(grid: str | os.PathLike) -> Path:
    """A path to a YAML file, or the name of a shipped grid (``moebench/grids/<name>.yaml``)."""
    path = Path(grid)
    if path.is_file():
        return path
    shipped = GRIDS_DIR / f"{grid}.yaml"
    if not str(grid).endswith((".yaml", ".yml")) and shipped.is_file():
        return shipped
    known = shipped_grids()
    close = difflib.get_close_matches(str(grid), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise GridError(f"{grid}: no such grid file, and not a shipped grid name.{hint} "
                    f"Shipped grids: {', '.join(known)} (in {GRIDS_DIR}).")


def load(grid: str | os.PathLike | dict, file: str | None = None) -> dict:
    """Read and validate a grid; returns a normalised dict (``tasks`` always a list of blocks,
    ``routers`` always mappings, ``match`` a mapping, ``executor`` with defaults filled in)."""
    if isinstance(grid, dict):
        raw, file = copy.deepcopy(grid), file or "<grid>"
        stem = "grid"
    else:
        path = resolve_path(grid)
        file, stem = str(path), path.stem
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise GridError(f"{file}: not valid YAML: {err}") from None
    return validate(raw, file, default_name=stem)


def validate(raw, file: str, default_name: str = "grid") -> dict:
    ctx = _Ctx(file)
    if not isinstance(raw, dict):
        raise ctx.error("(top level)", f"expected a mapping of grid keys, got {_tname(raw)}")
    ctx.keys(raw, TOP_KEYS, "")
    name = raw.get("name", default_name)
    ctx.check(name, ("a name of letters, digits, '.', '_' or '-'",
                     lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]+", v) and v not in (".", "..")),
              "name")
    grid = {"name": name, "description": raw.get("description", ""), "file": file}

    # task blocks
    if "tasks" in raw:
        for key in ("task", "preset", "task_args", "model"):
            if key in raw:
                raise ctx.error(key, f"give either top-level `{key}` or a `tasks:` list of blocks, not both; "
                                     f"move it into each block of `tasks`")
        ctx.check(raw["tasks"], ("a non-empty list of task blocks",
                                 lambda v: isinstance(v, list) and len(v) > 0), "tasks")
        blocks = [(f"tasks[{i}]", b) for i, b in enumerate(raw["tasks"])]
    else:
        if "task" not in raw:
            raise ctx.error("task", "missing: name a registered task (see `moebench tasks`), "
                                    "or give a `tasks:` list of blocks")
        blocks = [("", {k: raw[k] for k in ("task", "preset", "task_args", "model") if k in raw})]
    grid["moe"] = _check_moe(ctx, raw.get("moe"), "moe")
    grid["train"] = _check_train(ctx, raw.get("train"), "train")
    grid["tasks"] = []
    for path, block in blocks:
        p = (lambda k: f"{path}.{k}") if path else (lambda k: k)
        ctx.check(block, _MAP, path or "(top level)")
        ctx.keys(block, BLOCK_KEYS, path)
        if "task" not in block:
            raise ctx.error(p("task"), "missing: name a registered task (see `moebench tasks`)")
        ctx.check(block["task"], _STR, p("task"))
        _check_task(ctx, block["task"], p("task"))
        model = block.get("model")
        if model is not None:
            ctx.check(model, _MAP, p("model"))
        pre = _preset(ctx, block["task"], block.get("preset"), p("preset"))
        grid["tasks"].append({
            "task": block["task"],
            "preset": block.get("preset"),
            "task_args": {**pre["task_args"], **copy.deepcopy(ctx.mapping(block.get("task_args"), p("task_args")))},
            "model": None if model is None and not pre["model"] else {**pre["model"], **copy.deepcopy(model or {})},
            "preset_moe": pre["moe"],
            "preset_train": pre["train"],
            "moe": _check_moe(ctx, block.get("moe") if path else None, p("moe")),
            "train": _check_train(ctx, block.get("train") if path else None, p("train")),
            "path": path or "(top level)",
        })

    seeds = raw.get("seeds", [0])
    ctx.check(seeds, ("a non-empty list of distinct integers",
                      lambda v: isinstance(v, list) and v and all(_INT[1](s) for s in v) and len(set(v)) == len(v)),
              "seeds")
    grid["seeds"] = list(seeds)
    grid["routers"] = _check_routers(ctx, raw.get("routers"))
    grid["sweep"] = _check_sweep(ctx, raw.get("sweep"))
    grid["match"] = _check_match(ctx, raw.get("match", "active_flops"))
    if grid["match"]["mode"] != "none":
        for r in grid["routers"]:
            if "d_hidden" in r["moe"]:
                raise ctx.error(f"{r['path']}.moe.d_hidden", f"with match: {grid['match']['mode']} the width is set "
                                                             f"by matching; remove it (or use match: none to set "
                                                             f"widths by hand)")
    executor = ctx.mapping(raw.get("executor"), "executor")
    ctx.keys(executor, EXECUTOR_KEYS, "executor")
    for key, value in executor.items():
        ctx.check(value, EXECUTOR_TYPES[key], f"executor.{key}")
    grid["executor"] = {**copy.deepcopy(EXECUTOR_DEFAULTS), **copy.deepcopy(executor)}
    return grid


def _check_task(ctx: _Ctx, name: str, path: str) -> None:
    from .registry import TASKS, UnknownNameError

    try:
        TASKS.get(name)
    except UnknownNameError as err:
        raise ctx.error(path, str(err)) from None


def _preset(ctx: _Ctx, task: str, size, path: str) -> dict:
    """A task's named preset (``Task.preset(size)`` -> task_args, model, moe defaults, train); the grid
    file's own values override it, so a preset only fills in what the grid leaves out."""
    empty = {"task_args": {}, "model": {}, "moe": {}, "train": {}}
    if size is None:
        return empty
    ctx.check(size, _STR, path)
    from .registry import TASKS

    cls = TASKS.get(task)
    if not getattr(cls, "presets", None):
        raise ctx.error(path, f"task {task!r} defines no presets; remove `preset:` and give task_args / model / "
                              f"train explicitly")
    try:
        parts = cls.preset(size)
    except (ValueError, KeyError) as err:
        raise ctx.error(path, str(err)) from None
    if not (isinstance(parts, tuple) and len(parts) == 4 and all(isinstance(x, dict) or x is None for x in parts)):
        raise ctx.error(path, f"{cls.__name__}.preset({size!r}) must return (task_args, model, moe, train) dicts")
    out = dict(zip(("task_args", "model", "moe", "train"), (copy.deepcopy(x or {}) for x in parts)))
    out["moe"] = {k: v for k, v in out["moe"].items() if k in MOE_KEYS}
    _check_moe(ctx, out["moe"], f"{path} ({task} preset {size!r}: moe)")
    out["train"] = _check_train(ctx, out["train"], f"{path} ({task} preset {size!r}: train)")
    return out


def _check_router_name(ctx: _Ctx, name: str, path: str) -> None:
    from .registry import ROUTERS, UnknownNameError

    if name == DENSE:
        return
    try:
        ROUTERS.get(name)
    except UnknownNameError as err:
        raise ctx.error(path, f"{err} (or `dense` for the model without MoE)") from None


def _check_moe(ctx: _Ctx, value, path: str) -> dict:
    moe = ctx.mapping(value, path)
    ctx.keys(moe, MOE_KEYS, path)
    for key, v in moe.items():
        ctx.check(v, MOE_TYPES[key], f"{path}.{key}")
    return copy.deepcopy(moe)


def _check_train(ctx: _Ctx, value, path: str) -> dict:
    train = dict(ctx.mapping(value, path))
    ctx.keys(train, TRAIN_KEYS, path)
    for key, v in train.items():
        if isinstance(v, str) and _NUMERIC_TEXT.fullmatch(v):  # YAML 1.1 reads 3e-4 as a string
            train[key] = v = float(v)
        ctx.check(v, TRAIN_TYPES[key], f"{path}.{key}")
    return copy.deepcopy(train)


def _check_routers(ctx: _Ctx, value) -> list[dict]:
    if value is None:
        raise ctx.error("routers", "missing: list the routers to compare, e.g. [dense, softmax-topk, switch]")
    ctx.check(value, ("a non-empty list of router names or mappings",
                      lambda v: isinstance(v, list) and len(v) > 0), "routers")
    out, labels = [], {}
    for i, entry in enumerate(value):
        path = f"routers[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        ctx.check(entry, ("a router name or a mapping {name, label, args, moe}", lambda v: isinstance(v, dict)), path)
        ctx.keys(entry, ROUTER_KEYS, path)
        if "name" not in entry:
            raise ctx.error(f"{path}.name", "missing: the registered router's name (see `moebench routers`)")
        ctx.check(entry["name"], _STR, f"{path}.name")
        _check_router_name(ctx, entry["name"], f"{path}.name")
        args = ctx.mapping(entry.get("args"), f"{path}.args")
        moe = _check_moe(ctx, entry.get("moe"), f"{path}.moe")
        if entry["name"] == DENSE and (args or moe):
            raise ctx.error(path, "`dense` takes no args or moe overrides (it is the model without MoE); remove them")
        _check_router_args(ctx, entry["name"], args, f"{path}.args")
        for key in ("d_model", "num_experts"):
            if key in args:
                raise ctx.error(f"{path}.args.{key}", f"set by the layer, not the router; "
                                                      f"use {path}.moe.num_experts / the model section instead")
        label = entry.get("label") or _default_label(entry["name"], args)
        ctx.check(label, ("a folder-safe name (letters, digits and . _ + = -, starting with a letter or digit)",
                          lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", v)),
                  f"{path}.label")
        if label in labels:
            raise ctx.error(f"{path}.label", f"label {label!r} is already used by routers[{labels[label]}]; "
                                             f"labels name a row of the report, give this entry its own `label:`")
        labels[label] = i
        out.append({"name": entry["name"], "label": label, "args": copy.deepcopy(args), "moe": moe, "path": path})
    return out


def _router_options(name: str) -> list[str] | None:
    """The keyword options a router's constructor takes (None if it takes any: ``**kwargs``)."""
    import inspect

    from .registry import ROUTERS

    params = inspect.signature(ROUTERS.get(name).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n not in ("self", "d_model", "num_experts")]


def _check_router_args(ctx: _Ctx, name: str, args: dict, path: str) -> None:
    if name == DENSE:
        return
    known = _router_options(name)
    if known is None:
        return
    for key in args:
        if key not in known and key not in ("d_model", "num_experts"):
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ctx.error(f"{path}.{key}", f"router {name!r} has no option {key!r}{hint} "
                                             f"Its options: {', '.join(known)}")


def _default_label(name: str, args: dict) -> str:
    """``name`` or ``name+key=value+...``: a folder-safe name (see moebench.spec)."""
    if not args:
        return name
    text = name + "".join(f"+{k}={_fmt(v)}" for k, v in sorted(args.items()))
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _check_sweep(ctx: _Ctx, value) -> list[tuple[str, list]]:
    sweep = ctx.mapping(value, "sweep")
    axes = []
    for axis, values in sweep.items():
        path = f"sweep.{axis}"
        parts = str(axis).split(".")
        if len(parts) < 2 or parts[0] not in SWEEP_PREFIXES or not all(parts):
            close = difflib.get_close_matches(parts[0], SWEEP_PREFIXES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close and close[0] != parts[0] else ""
            raise ctx.error(path, f"an axis is a dotted path starting with one of {', '.join(SWEEP_PREFIXES)} "
                                  f"(e.g. moe.num_experts, router_args.top_k){hint}")
        ctx.check(values, ("a non-empty list of values", lambda v: isinstance(v, list) and len(v) > 0), path)
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ctx.error(path, f"values repeat ({values}); list each value once")
        if parts[0] in ("moe", "train"):
            if len(parts) != 2:
                raise ctx.error(path, f"{parts[0]} axes have one level, e.g. {parts[0]}.{parts[1]}")
            known, types = (MOE_KEYS, MOE_TYPES) if parts[0] == "moe" else (TRAIN_KEYS, TRAIN_TYPES)
            ctx.keys({parts[1]: None}, known, parts[0] + " (sweep axis)")
            for j, v in enumerate(values):
                ctx.check(v, types[parts[1]], f"{path}[{j}]")
        if parts[0] == "router_args" and len(parts) != 2:
            raise ctx.error(path, "router_args axes have one level, e.g. router_args.top_k")
        axes.append((str(axis), copy.deepcopy(values)))
    return axes


def _check_match(ctx: _Ctx, value) -> dict:
    if isinstance(value, str):
        value = {"mode": value}
    ctx.check(value, ("one of active_flops, params, none, or a mapping {mode, reference_active_experts}",
                      lambda v: isinstance(v, dict)), "match")
    ctx.keys(value, MATCH_KEYS, "match")
    mode = value.get("mode", "active_flops")
    if mode not in MATCH_MODES:
        close = difflib.get_close_matches(str(mode), MATCH_MODES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ctx.error("match" if "reference_active_experts" not in value else "match.mode",
                        f"expected one of {', '.join(MATCH_MODES)}, got {mode!r}{hint}")
    ref = value.get("reference_active_experts", 2)
    ctx.check(ref, _POS_NUM, "match.reference_active_experts")
    return {"mode": mode, "reference_active_experts": ref}


# -- expansion ---------------------------------------------------------------------------------------
def _set_path(d: dict, dotted: list[str], value) -> None:
    for key in dotted[:-1]:
        nxt = d.get(key)
        if not isinstance(nxt, dict):
            nxt = d[key] = {}
        d = nxt
    d[dotted[-1]] = copy.deepcopy(value)


def _merged_train(grid: dict, block: dict) -> dict:
    from .spec import DEFAULT_TRAIN

    return {**copy.deepcopy(DEFAULT_TRAIN), **block["preset_train"], **grid["train"], **block["train"]}


def expand(grid: str | os.PathLike | dict) -> list[dict]:
    """The grid's runs as resolved, matched spec dicts, in a fixed order: task block, sweep point
    (axes in file order), router entry, seed. Deterministic: the same file gives the same list."""
    g = grid if isinstance(grid, dict) and "tasks" in grid and "file" in grid else load(grid)
    ctx = _Ctx(g["file"])
    from .spec import run_id

    axes = g["sweep"]
    points = list(itertools.product(*[[(a, v) for v in vals] for a, vals in axes])) if axes else [()]
    specs, seen = [], {}
    for block in g["tasks"]:
        model_default = block["model"] if block["model"] is not None else {}  # {}: the task's default_model
        for point in points:
            for router in g["routers"]:
                dense = router["name"] == DENSE
                sweep = {}
                task_args = copy.deepcopy(block["task_args"])
                model = copy.deepcopy(model_default)
                train = _merged_train(g, block)
                moe = {**block["preset_moe"], **g["moe"], **block["moe"], **router["moe"]}
                router_args = copy.deepcopy(router["args"])
                for axis, value in point:
                    head, *rest = axis.split(".")
                    if dense and head in ("moe", "router_args"):
                        continue  # these axes do not exist for the model without MoE
                    sweep[axis] = copy.deepcopy(value)
                    if head == "moe":
                        if rest[0] in router["moe"]:
                            raise ctx.error(f"{router['path']}.moe.{rest[0]}",
                                            f"also swept by sweep.{axis}; remove one of the two")
                        moe[rest[0]] = copy.deepcopy(value)
                    elif head == "router_args":
                        if rest[0] in router["args"]:
                            raise ctx.error(f"{router['path']}.args.{rest[0]}",
                                            f"also swept by sweep.{axis}; remove one of the two")
                        router_args[rest[0]] = copy.deepcopy(value)
                    elif head == "train":
                        train[rest[0]] = copy.deepcopy(value)
                    elif head == "task_args":
                        _set_path(task_args, rest, value)
                    else:
                        _set_path(model, rest, value)
                if dense:
                    moe_spec = None
                else:
                    from .spec import DEFAULT_MOE

                    moe = {**{k: DEFAULT_MOE[k] for k in MOE_KEYS}, **moe}
                    moe_spec = {
                        "blocks": copy.deepcopy(moe["blocks"]),
                        "num_experts": moe["num_experts"],
                        "router": router["name"],
                        "router_args": router_args,
                        "d_hidden": moe.get("d_hidden"),
                        "capacity_factor": moe.get("capacity_factor"),
                        "upcycle": bool(moe.get("upcycle", False)),
                    }
                for seed in g["seeds"]:
                    spec = {
                        "grid": g["name"],
                        "task": block["task"],
                        "task_args": copy.deepcopy(task_args),
                        "model": copy.deepcopy(model),
                        "moe": copy.deepcopy(moe_spec),
                        "label": router["label"],
                        "seed": seed,
                        "train": copy.deepcopy(train),
                        "sweep": copy.deepcopy(sweep),
                        "match": None,
                    }
                    key = json.dumps(spec, sort_keys=True)
                    if key in seen:
                        continue  # the dense baseline under a moe/router_args axis: one run, not one per value
                    seen[key] = True
                    where = router["path"] if block["path"] == "(top level)" else f"{block['path']}, {router['path']}"
                    specs.append({"_where": where, "_router_path": router["path"],
                                  "_ref_e": {**block["preset_moe"], **g["moe"], **block["moe"]}.get("num_experts"),
                                  **spec})
    _match(g, specs, ctx)
    out = []
    for spec in specs:
        for key in ("_where", "_router_path", "_ref_e"):
            spec.pop(key)
        out.append(_finalise(spec, ctx))
    ids = {}
    for spec in out:
        rid = run_id(spec)
        if rid in ids:
            raise ctx.error("routers", f"two runs resolve to the same spec (run id {rid}): labels "
                                       f"{ids[rid]!r} and {spec['label']!r}; make the entries differ")
        ids[rid] = spec["label"]
    return out


def _finalise(spec: dict, ctx: _Ctx) -> dict:
    """Apply the spec module's defaults / validation, naming the grid file in any error."""
    from .spec import SpecError, resolve_spec

    try:
        return resolve_spec(spec)
    except SpecError as err:
        raise ctx.error(f"run {spec['label']!r} seed {spec['seed']}", str(err)) from None


# -- matching ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _probe_cached(key: str) -> dict:
    from .registry import TASKS

    cfg = json.loads(key)
    moe = {"blocks": cfg["blocks"], "num_experts": cfg["num_experts"], "router": REFERENCE_ROUTER,
           "router_args": {"top_k": 1}, "d_hidden": WIDTH_MULTIPLE, "capacity_factor": None, "upcycle": False}
    # weights do not change shapes: never load a checkpoint (or reach a hub) just to measure
    model_cfg = {k: v for k, v in cfg["model"].items() if k not in ("pretrained", "pretrained_strict")}
    notes = []
    try:
        task, task_err = TASKS.get(cfg["task"])(**cfg["task_args"]), None
    except Exception as err:  # noqa: BLE001 - e.g. a task that reads its data in __init__
        task, task_err = None, err

    def build(moe_cfg):
        try:
            if task_err is not None:
                raise task_err
            return task.build_model(copy.deepcopy(model_cfg), copy.deepcopy(moe_cfg))
        except Exception as err:  # noqa: BLE001 - e.g. a task that reads its data to size the model
            if "family" not in model_cfg:
                raise
            from .models import build_model
            from .moefy import moefy

            note = (f"task {cfg['task']!r} could not build its model here ({type(err).__name__}: {err}); "
                    f"measured from the model section alone")
            if note not in notes:
                notes.append(note)
            net = build_model(copy.deepcopy(model_cfg))
            if moe_cfg is not None:
                moefy(net, **moe_cfg)
            return net

    import logging

    logging.disable(logging.WARNING)  # e.g. open_clip's "no pretrained weights loaded", twice per probe
    try:
        return _measure(build, moe, cfg, notes)
    finally:
        logging.disable(logging.NOTSET)


def _measure(build, moe: dict, cfg: dict, notes: list) -> dict:
    import torch

    from .layer import moe_layers

    with torch.random.fork_rng():
        moe_model = build(moe)
        layers = [(n, m) for n, m in moe_model.named_modules() if m in set(moe_layers(moe_model))]
        if not layers:
            raise GridError(f"task {cfg['task']!r} built no MoE layer for moe.blocks={cfg['blocks']}; "
                            f"check the block indices against the model's depth")
        moe_params = sum(p.numel() for _, m in layers for p in m.parameters())
        rest = sum(p.numel() for p in moe_model.parameters()) - moe_params
        d_models = [m.d_model for _, m in layers]
        names = [n for n, _ in layers]
        del moe_model
        dense_model = build(None)
        modules = dict(dense_model.named_modules())
        dense_flops, dense_hidden = 0.0, []
        for n in names:
            linears = [m for m in modules[n].modules() if isinstance(m, torch.nn.Linear)] if n in modules else []
            dense_flops += sum(2.0 * m.in_features * m.out_features for m in linears)
            dense_hidden.append(linears[0].out_features if linears else None)
        dense_total = sum(p.numel() for p in dense_model.parameters())
    return {"d_models": d_models, "rest_params": rest, "dense_params": dense_total,
            "dense_mlp_flops": dense_flops, "dense_hidden": dense_hidden, "layer_names": names, "notes": notes}


def _dense_width(spec: dict, ctx: "_Ctx") -> int:
    """The dense MLP width in the MoE blocks: what ``moe.d_hidden: null`` means."""
    widths = set(probe(spec)["dense_hidden"])
    if len(widths) != 1 or None in widths:
        raise ctx.error("moe.d_hidden", f"null means the dense MLP's width, but the MLPs of blocks "
                                        f"{spec['moe']['blocks']} have widths {sorted(map(str, widths))}; "
                                        f"set moe.d_hidden to an integer")
    return widths.pop()


def probe(spec: dict, blocks=None, ctx: "_Ctx | None" = None) -> dict:
    """What the model around the MoE layers looks like: d_model of each MoE layer, parameters outside
    them, and the dense model's parameters and MLP FLOPs in the same blocks. Built once per
    (task, task_args, model, blocks) and cached, with a tiny expert width so it is cheap. ``blocks``
    places a dense spec's comparison (default: every block)."""
    moe = spec["moe"] or {}
    key = json.dumps({"task": spec["task"], "task_args": spec["task_args"], "model": spec["model"],
                      "blocks": moe.get("blocks", blocks if blocks is not None else "all"),
                      "num_experts": moe.get("num_experts", 2)}, sort_keys=True)
    try:
        return _probe_cached(key)
    except GridError:
        raise
    except Exception as err:  # noqa: BLE001 - any build failure is the grid's model/moe section
        ctx = ctx or _Ctx("<grid>")
        raise ctx.error("model / moe.blocks", f"cannot build task {spec['task']!r}'s model to measure it "
                                              f"(task_args={spec['task_args']}, model={spec['model']}, "
                                              f"moe.blocks={moe.get('blocks', blocks)}): "
                                              f"{type(err).__name__}: {err}") from None


def _router(name: str, d_model: int, num_experts: int, args: dict):
    from .registry import ROUTERS

    return ROUTERS.get(name)(d_model=d_model, num_experts=num_experts, **copy.deepcopy(args))


def _width_fix(ref_width: int, ratios) -> str:
    """Reference widths near ``ref_width`` for which ``width * ratio`` is a multiple of 4 for every ratio."""
    def ok(w: int) -> bool:
        return all((Fraction(w) * r).denominator == 1 and (Fraction(w) * r) % WIDTH_MULTIPLE == 0 for r in ratios)

    good = [w for w in range(WIDTH_MULTIPLE, 4 * ref_width + 1, WIDTH_MULTIPLE) if ok(w)]
    good.sort(key=lambda w: (abs(w - ref_width), w))
    return ", ".join(str(w) for w in sorted(good[:3])) or "none near it"


def _match(g: dict, specs: list[dict], ctx: _Ctx) -> None:
    mode = g["match"]["mode"]
    ref_a = Fraction(g["match"]["reference_active_experts"]).limit_denominator(1000)
    planned = []
    for spec in specs:
        where = f"run {spec['label']!r} ({spec['_where']}, sweep {spec['sweep'] or '{}'})"
        moe = spec["moe"]
        if moe is None:
            spec["match"] = {"mode": mode, "dense": "keeps the model's own MLP width (not rescaled)"}
            continue
        pr = probe(spec, ctx=ctx)
        if moe["d_hidden"] is None:
            moe["d_hidden"] = _dense_width(spec, ctx)
        try:
            routers = [_router(moe["router"], d, moe["num_experts"], moe["router_args"]) for d in pr["d_models"]]
        except (TypeError, ValueError) as err:
            named = [k for k in moe["router_args"] if re.search(rf"\b{re.escape(str(k))}\b", str(err))]
            origin = {k: (f"sweep.router_args.{k}" if f"router_args.{k}" in spec["sweep"] else
                          f"{spec['_router_path']}.args.{k}") for k in moe["router_args"]}
            path = origin[named[0]] if named else f"{spec['_router_path']}.args"
            raise ctx.error(path, f"router {moe['router']!r} rejects its options {moe['router_args']} "
                                  f"(num_experts={moe['num_experts']}): {err}") from None
        a = Fraction(routers[0].active_experts_per_token).limit_denominator(1000)
        ref_width = moe["d_hidden"]
        if mode == "active_flops":
            ratio = ref_a / a
            reference = {"router": REFERENCE_ROUTER, "active_experts": float(ref_a), "d_hidden": ref_width}
            why = (f"it runs {float(a):g} experts per token, so its experts are {float(ratio):g} x the "
                   f"reference width {ref_width} (reference: {float(ref_a):g} experts per token)")
        elif mode == "params":
            ref_e = spec["_ref_e"] or moe["num_experts"]
            ratio = Fraction(ref_e, moe["num_experts"])
            reference = {"num_experts": ref_e, "d_hidden": ref_width}
            why = (f"it has {moe['num_experts']} experts, so each is {float(ratio):g} x the reference width "
                   f"{ref_width} (reference: {ref_e} experts)")
        else:
            ratio, reference, why = Fraction(1), None, ""
        planned.append((spec, ratio, a, routers, pr, reference, why, where))
    all_ratios = {p[1] for p in planned}
    for spec, ratio, a, routers, pr, reference, why, where in planned:
        moe = spec["moe"]
        ref_width = moe["d_hidden"]
        width = Fraction(ref_width) * ratio
        if mode != "none" and (width.denominator != 1 or width % WIDTH_MULTIPLE != 0):
            raise ctx.error("moe.d_hidden", f"cannot match {where}: {why}, which gives {float(width):g}, not an "
                                            f"integer multiple of {WIDTH_MULTIPLE} (the grouped GEMM's alignment). "
                                            f"Fix: set moe.d_hidden to one of {_width_fix(ref_width, all_ratios)} "
                                            f"(these work for every run of the grid), or drop this router, "
                                            f"or use match: none")
        moe["d_hidden"] = int(width)
        n_layers = len(pr["d_models"])
        spec["match"] = {
            "mode": mode,
            "reference": reference,
            "active_experts_per_token": float(a),
            "d_hidden": int(width),
            "expert_flops_per_token": float(sum(float(a) * 4 * d * int(width) for d in pr["d_models"])),
            "expert_params": int(sum(moe["num_experts"] * (2 * d * int(width) + int(width) + d) for d in pr["d_models"])),
            "router_flops_per_token": float(sum(r.flops_per_token() for r in routers)),
            "moe_layers": n_layers,
            "note": "router FLOPs are reported, not matched" if mode == "active_flops" else
                    ("expert biases and router-specific extras are reported, not matched" if mode == "params" else
                     "widths as given"),
        }
    upcycled = [s for s in specs if s["moe"] and s["moe"]["upcycle"]]
    widths = {s["moe"]["d_hidden"] for s in upcycled}
    if len(widths) > 1:
        raise ctx.error("moe.upcycle", f"upcycle: true copies the dense MLP into every expert, so every run "
                                       f"needs the same expert width, but matching ({mode}) gives widths "
                                       f"{sorted(widths)}; use match: none, or routers with the same active experts")


# -- costs for `grid show` ---------------------------------------------------------------------------
def costs(spec: dict, blocks=None) -> dict:
    """Parameters and FLOPs per token of the MoE sub-layers of one run, building only its MoE layers
    (the rest of the model is identical across a grid's runs and comes from the cached probe).
    For the dense baseline, ``blocks`` says which blocks' MLPs to count (those the MoE runs replace)."""
    pr = probe(spec, blocks)
    if spec["moe"] is None:
        return {"params_total": pr["dense_params"], "params_active": pr["dense_params"],
                "mlp_flops_per_token": pr["dense_mlp_flops"], "router_flops_per_token": 0.0,
                "dense_hidden": "/".join(sorted({str(h) for h in pr["dense_hidden"]}))}
    moe = dict(spec["moe"])
    if moe["d_hidden"] is None:
        moe["d_hidden"] = _dense_width(spec, _Ctx("<spec>"))
    return dict(_moe_costs(json.dumps({"d_models": pr["d_models"], "moe": moe}, sort_keys=True),
                           pr["rest_params"]))


@functools.lru_cache(maxsize=None)
def _moe_costs(key: str, rest_params: int) -> dict:
    """Counts do not depend on weight values, so the layers are built on the meta device (no memory,
    no init work such as ERMoE's SVD); a router that cannot be built there is built on the CPU."""
    import torch

    from .layer import MoELayer

    cfg = json.loads(key)
    moe = cfg["moe"]
    total = active = flops = router_flops = 0.0
    for d in cfg["d_models"]:
        def build():
            return MoELayer(d, moe["d_hidden"], moe["num_experts"], moe["router"], moe["router_args"],
                            moe["capacity_factor"])
        try:
            with torch.device("meta"):
                layer = build()
        except (RuntimeError, NotImplementedError):
            with torch.random.fork_rng():
                layer = build()
        total += sum(p.numel() for p in layer.parameters())
        active += layer.active_params()
        flops += layer.flops_per_token()
        router_flops += layer.router.flops_per_token()
        del layer
    return {"params_total": int(rest_params + total), "params_active": int(rest_params + active),
            "mlp_flops_per_token": flops, "router_flops_per_token": router_flops}


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def show(grid: str | os.PathLike | dict) -> str:
    """The table `moebench grid show` prints: one row per run with its matched width and costs."""
    g = load(grid) if not (isinstance(grid, dict) and "file" in grid) else grid
    specs = expand(g)
    from .spec import run_id

    axes = [a for a, _ in g["sweep"]]
    head = ["run_id", "task", "label", "seed", *axes, "d_hidden", "mlp_flops/tok", "router_flops/tok",
            "params", "active_params"]
    rows = []
    for spec in specs:
        same = [s for s in specs if s["moe"] and all(s[k] == spec[k] for k in ("task", "task_args", "model"))]
        c = costs(spec, blocks=same[0]["moe"]["blocks"] if same else None)
        rows.append([run_id(spec), spec["task"], spec["label"], str(spec["seed"]),
                     *[_fmt(spec["sweep"][a]) if a in spec["sweep"] else "-" for a in axes],
                     str(spec["moe"]["d_hidden"]) if spec["moe"] else f"{c['dense_hidden']} (dense)",
                     _human(c["mlp_flops_per_token"]), _human(c["router_flops_per_token"]),
                     _human(c["params_total"]), _human(c["params_active"])])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = [f"grid {g['name']} ({g['file']}): {len(specs)} runs, match: {g['match']['mode']}"
             + (f" (reference: {REFERENCE_ROUTER} top-{g['match']['reference_active_experts']:g} "
                f"at the grid's d_hidden)" if g["match"]["mode"] == "active_flops" else ""),
             "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    notes = sorted({n for spec in specs if spec["moe"] for n in probe(spec, ctx=_Ctx(g["file"]))["notes"]})
    lines += [f"note: {n}" for n in notes]
    lines.append("mlp_flops/tok: FLOPs per token of the MoE blocks' MLP sub-layers (experts + router for MoE, "
                 "the dense MLP for dense); the rest of the model is the same in every run.")
    if g["match"]["mode"] == "active_flops":
        lines.append("Router FLOPs are reported, not matched. The dense baseline keeps the model's own MLP width.")
    return "\n".join(lines)


def cli_show(args) -> int:
    """``moebench grid show GRID``: the table, or the grid error (exit 2) without a traceback."""
    try:
        print(show(args.grid))
    except GridError as err:
        print(f"error: {err}", file=__import__("sys").stderr)
        return 2
    return 0
