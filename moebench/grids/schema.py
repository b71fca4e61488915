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
      upcycle: false             # true: copy the dense MLP into every expert; drop: Drop-Upcycling
      upcycle_drop: null         # with upcycle: drop, the share of hidden units re-drawn per expert (null: 0.5)
      mode: replace              # replace the MLP | adapter: x + alpha * MoE(x) after the block (EMoE)
      patches_only: false        # adapter mode: CLS / register tokens bypass the branch
      freeze_backbone: false     # train only MoE layers (+ adapter alphas) and the head; train_norms: + norms
    train: {steps: ..., batch_size: ..., lr: ..., ...}   # budget, shared by all runs (moebench.training.spec)
    pretrain: {steps: 300, ...}  # optional (grid level or per task block; null: none): a dense model of the
                                 # same architecture trained first, once per seed, cached content-addressed
                                 # under <results>/.pretrain/; every run of the block (dense included) starts
                                 # from its weights (model.pretrained). Keys: train keys overriding `train`.
                                 # See moebench.grids.pretrain.
    seeds: [0, 1]
    routers:                     # a name, or a mapping; `dense` = the model without MoE
      - dense
      - softmax-topk
      - {name: switch, label: switch-cf1.5, args: {...}, moe: {capacity_factor: 1.5}}
      - {name: hash, label: hash-params, match: params}   # a control row matched another way
    sweep:                       # product over axes (dotted paths)
      moe.num_experts: [4, 8]    # moe.<key> | router_args.<key> | train.<key> | task_args.<..> | model.<..>
    match: active_flops          # active_flops (default) | params | none
                                 # or {mode: active_flops, reference_active_experts: 2}
    executor: {cluster: auto, partition: null, time_min: 60, cpus_per_task: 1, gpus_per_node: 0,
               tasks_per_node: null, mem_gb: null, array_parallelism: 64, max_workers: null, runs_per_job: 1,
               sbatch_extra: {}, max_retries: 2}

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
- A router entry's own ``match:`` (one of the modes) overrides the grid's for that entry: e.g.
  ``{name: hash, label: hash-params, match: params}`` next to the FLOP-matched ``hash`` tells "more
  parameters" (a top-1 router FLOP-matched to top-2 gets twice-wide experts) apart from "better
  routing". The entry needs its own label.
- The dense baseline keeps the model's own MLP width (it is "the model without MoE", the one a
  reader knows). It is FLOP-matched to the MoE runs exactly when that width equals
  ``reference_active_experts * d_hidden``; ``moebench grid show`` prints both so it is visible.
- ``upcycle: true`` copies the dense MLP into each expert (``drop``: then re-draws a share
  ``upcycle_drop`` of each expert's hidden units, Drop-Upcycling), which needs every run's width to be
  the same; a grid whose matching would give different widths is refused.

Measuring: matching needs each MoE layer's d_model (and ``d_hidden: null`` the dense MLP width), so
``expand`` builds the task's model once per (task, task_args, model, blocks, num_experts), with tiny
experts and never loading weights. A task that reads its data to build (e.g. to count ImageNet's
classes) falls back to ``moebench.core.models.build_model`` on the model section, and ``grid show`` says so.
Order of the expanded runs: task block, sweep point (axes and values in file order), router entry,
seed; the dense baseline appears once per point of the axes that apply to it (train/task_args/model).
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from moebench.core.config import (
    LAYER_FILLED_ARGS,
    ConfigError,
    ExecutorConfig,
    MoEConfig,
    TrainConfig,
    check_options,
    check_pretrain,
    check_section,
    check_seed,
    coerce,
    defaults,
    fields_of,
    first_unknown,
)

GRIDS_DIR = Path(__file__).resolve().parent / "configs"

TOP_KEYS = (
    "name",
    "description",
    "task",
    "preset",
    "task_args",
    "model",
    "tasks",
    "moe",
    "train",
    "pretrain",
    "seeds",
    "routers",
    "sweep",
    "match",
    "executor",
)
BLOCK_KEYS = ("task", "preset", "task_args", "model", "moe", "train", "pretrain")
MOE_KEYS = tuple(k for k in fields_of(MoEConfig) if k not in ("router", "router_args"))  # per grid/block/router
ROUTER_KEYS = ("name", "label", "args", "moe", "match")
MATCH_KEYS = ("mode", "reference_active_experts")
MATCH_MODES = ("active_flops", "params", "none")
EXECUTOR_KEYS = tuple(fields_of(ExecutorConfig))
CLUSTERS = fields_of(ExecutorConfig)["cluster"].metadata["choices"]
TRAIN_KEYS = tuple(fields_of(TrainConfig))
SWEEP_PREFIXES = ("moe", "router_args", "train", "task_args", "model")
DENSE = "dense"
REFERENCE_ROUTER = "softmax-topk"
WIDTH_MULTIPLE = 4

EXECUTOR_DEFAULTS = defaults(ExecutorConfig)

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


_BLOCKS = (
    "a list of block indices, an integer, or a string such as 'all'",
    lambda v: isinstance(v, str) or _INT[1](v) or (isinstance(v, list) and all(_INT[1](x) for x in v)),
)


class GridError(ValueError):
    """A mistake in a grid file; the message names the file, the key path, what was expected, and the fix."""


def _tname(v) -> str:
    return "null" if v is None else type(v).__name__


class GridContext:
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
        found = first_unknown(mapping, known)
        if found:
            key, close = found
            hint = f"; did you mean {close!r}?" if close else ""
            where = f"{path}.{key}" if path else str(key)
            raise self.error(where, f"unknown key {key!r}{hint}. Known keys here: {', '.join(known)}")

    def section(self, cls, value, path: str) -> dict:
        """One config section checked against the shared schema (`moebench.core.config`)."""
        mapping = self.mapping(value, path)
        self.keys(mapping, [k for k in fields_of(cls) if cls is not MoEConfig or k in MOE_KEYS], path)
        try:
            return check_section(cls, copy.deepcopy(mapping), path)
        except ConfigError as err:
            raise self.error(err.path, err.describe()) from None

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
    raise GridError(
        f"{grid}: no such grid file, and not a shipped grid name.{hint} "
        f"Shipped grids: {', '.join(known)} (in {GRIDS_DIR})."
    )


def load(
    grid: str | os.PathLike | dict, file: str | None = None, overrides=(), allow_placeholders: bool = False
) -> dict:
    """Read and validate a grid; returns a normalised dict (``tasks`` always a list of blocks,
    ``routers`` always mappings, ``match`` a mapping, ``executor`` with defaults filled in).
    ``overrides`` are ``KEY=VALUE`` strings (``--set``) applied to the file's content first. A
    placeholder path (``/path/to/...``) left in the grid is refused unless ``allow_placeholders``
    (nothing could run on it). A grid that ``load`` returned already is returned as is."""
    if isinstance(grid, dict) and "file" in grid and "executor" in grid and not overrides:
        return grid  # normalised already (raw grids cannot have a `file` key)
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
    if overrides:
        raw = _unshared(raw)  # a YAML alias (&clip / *clip) must not carry one block's --set to another
    for assignment in overrides:
        apply_override(raw, assignment, file)
    g = validate(raw, file, default_name=stem)
    if not allow_placeholders:
        refuse_placeholders(raw, file, stem)
    return g


PLACEHOLDER = "/path/to/"


def apply_override(raw, assignment: str, file: str) -> None:
    """``--set KEY=VALUE`` on a grid's content, in place: KEY is a dotted path with ``[i]`` for list
    items (``task_args.data``, ``tasks[0].task_args.root``, ``executor.sbatch_extra.account``);
    VALUE is read as YAML. Missing mappings on the way are created; the grid is validated after."""
    from moebench.training.spec import SpecError, parse_value

    if not isinstance(raw, dict) or "=" not in assignment:
        raise GridError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set task_args.data=/data/imagenet")
    path, text = assignment.split("=", 1)
    path = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path.strip())  # tasks.0.x is tasks[0].x
    tokens = re.findall(r"\[(\d+)\]|([^.\[\]]+)", path)
    keys: list[int | str] = [int(i) if i else name for i, name in tokens]
    if not keys or _key_path(keys) != path:
        raise GridError(
            f"--set {assignment!r}: KEY must be a dotted path such as task_args.data or tasks.0.task_args.root"
        )
    try:
        value = parse_value(text)
    except SpecError as err:
        raise GridError(f"--set {assignment!r}: {err}") from None
    node = raw
    for i, key in enumerate(keys):
        where = _key_path(keys[: i + 1])
        last = i == len(keys) - 1
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                raise GridError(
                    f"--set {assignment!r}: {where} does not exist in {file} "
                    f"({_key_path(keys[:i]) or 'the top level'} is not a list that long)"
                )
        elif not isinstance(node, dict):
            raise GridError(f"--set {assignment!r}: {_key_path(keys[:i])} is {node!r} in {file}, not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def _unshared(value):
    """A deep copy in which no two places share an object (``copy.deepcopy`` keeps YAML aliases shared)."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def _key_path(keys) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


def _shell_key(key: str) -> str:
    """``tasks[0].x`` as ``tasks.0.x``: the same key for --set, without brackets the shell would glob."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def placeholders(raw, keys=()) -> list[tuple[str, str]]:
    """``(key path, value)`` of every string in the grid's content that starts with ``/path/to/``."""
    if isinstance(raw, dict):
        return [p for k, v in raw.items() for p in placeholders(v, (*keys, str(k)))]
    if isinstance(raw, list):
        return [p for i, v in enumerate(raw) for p in placeholders(v, (*keys, i))]
    if isinstance(raw, str) and raw.strip().startswith(PLACEHOLDER):
        return [(_key_path(keys), raw)]
    return []


def refuse_placeholders(raw, file: str, name: str = "GRID") -> None:
    """A GridError naming every placeholder key, the file, and the two ways to give a real value."""
    found = placeholders(raw)
    if not found:
        return
    grid = name if Path(file).parent == GRIDS_DIR else file
    width = max(len(k) for k, _ in found)
    example = " ".join(
        f"--set {_shell_key(k)}=/your/{Path(v).name}" for k, v in found
    )  # every key: ready to edit and run
    raise GridError(
        f"{file}: {len(found)} placeholder path(s) still to set (nothing can run on them):\n"
        + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in found)
        + f"\nGive the real values without editing the shipped file, on the command line (one --set per key):\n"
        f"  moebench grid show {grid} {example}\n"
        f"  moebench run {grid} {example}\n"
        f"or copy the grid, edit the copy, and use the copy's path:\n"
        f"  cp {file} my-{Path(file).stem}.yaml; moebench run my-{Path(file).stem}.yaml"
    )


def validate(raw, file: str, default_name: str = "grid") -> dict:
    ctx = GridContext(file)
    if not isinstance(raw, dict):
        raise ctx.error("(top level)", f"expected a mapping of grid keys, got {_tname(raw)}")
    ctx.keys(raw, TOP_KEYS, "")
    grid = {
        "name": _check_name(ctx, raw.get("name", default_name)),
        "description": raw.get("description", ""),
        "file": file,
    }
    blocks = _task_blocks(ctx, raw)
    grid["moe"] = _check_moe(ctx, raw.get("moe"), "moe")
    grid["train"] = _check_train(ctx, raw.get("train"), "train")
    grid["pretrain"] = _check_pretrain(ctx, raw.get("pretrain"), "pretrain")
    grid["tasks"] = [_check_block(ctx, path, block, grid["pretrain"]) for path, block in blocks]
    grid["seeds"] = _check_seeds(ctx, raw.get("seeds", [0]))
    grid["routers"] = _check_routers(ctx, raw.get("routers"))
    grid["sweep"] = _check_sweep(ctx, raw.get("sweep"))
    grid["match"] = _check_match(ctx, raw.get("match", "active_flops"))
    _check_swept_router_args(ctx, grid)
    _check_matched_widths(ctx, grid)
    grid["executor"] = {**defaults(ExecutorConfig), **ctx.section(ExecutorConfig, raw.get("executor"), "executor")}
    _check_tasks(ctx, grid)
    return grid


def _check_name(ctx: GridContext, name) -> str:
    ctx.check(
        name,
        (
            "a name of letters, digits, '.', '_' or '-'",
            lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9._-]+", v) and v not in (".", ".."),
        ),
        "name",
    )
    return name


def _task_blocks(ctx: GridContext, raw: dict) -> list[tuple[str, Any]]:
    """(path, block) per task block: the ``tasks:`` list, or the top level's task keys as one block."""
    if "tasks" in raw:
        for key in ("task", "preset", "task_args", "model"):
            if key in raw:
                raise ctx.error(
                    key,
                    f"give either top-level `{key}` or a `tasks:` list of blocks, not both; "
                    f"move it into each block of `tasks`",
                )
        ctx.check(
            raw["tasks"], ("a non-empty list of task blocks", lambda v: isinstance(v, list) and len(v) > 0), "tasks"
        )
        return [(f"tasks[{i}]", b) for i, b in enumerate(raw["tasks"])]
    if "task" not in raw:
        raise ctx.error(
            "task", "missing: name a registered task (see `moebench tasks`), or give a `tasks:` list of blocks"
        )
    return [("", {k: raw[k] for k in ("task", "preset", "task_args", "model") if k in raw})]


def _check_block(ctx: GridContext, path: str, block, grid_pretrain) -> dict:
    """One task block, normalised (its preset filled in under what the block sets)."""
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
    return {
        "task": block["task"],
        "preset": block.get("preset"),
        "task_args": {**pre["task_args"], **copy.deepcopy(ctx.mapping(block.get("task_args"), p("task_args")))},
        "model": None if model is None and not pre["model"] else {**pre["model"], **copy.deepcopy(model or {})},
        "preset_moe": pre["moe"],
        "preset_train": pre["train"],
        "moe": _check_moe(ctx, block.get("moe") if path else None, p("moe")),
        "train": _check_train(ctx, block.get("train") if path else None, p("train")),
        # a block's own `pretrain:` (null included) replaces the grid's
        "pretrain": _check_pretrain(ctx, block["pretrain"], p("pretrain"))
        if path and "pretrain" in block
        else grid_pretrain,
        "path": path or "(top level)",
    }


def _check_seeds(ctx: GridContext, seeds) -> list[int]:
    ctx.check(
        seeds,
        (
            "a non-empty list of distinct integers",
            lambda v: isinstance(v, list) and v and all(_INT[1](s) for s in v) and len(set(v)) == len(v),
        ),
        "seeds",
    )
    for i, seed in enumerate(seeds):
        try:
            check_seed(seed, f"seeds[{i}]")
        except ConfigError as err:
            raise ctx.error(err.path, err.describe()) from None
    return list(seeds)


def _check_swept_router_args(ctx: GridContext, grid: dict) -> None:
    """A ``router_args.<key>`` axis's values against each router entry that declares ``key`` (the same
    check as an entry's own args; `Router.options`)."""
    from moebench.core.registry import ROUTERS

    for axis, values in grid["sweep"]:
        head, _, key = axis.partition(".")
        if head != "router_args":
            continue
        for r in grid["routers"]:
            declared = {} if r["name"] == DENSE else ROUTERS.get(r["name"]).options
            if key not in declared:
                continue
            for j, v in enumerate(values):
                try:
                    check_options(declared, {key: copy.deepcopy(v)}, "")
                except ConfigError as err:
                    raise ctx.error(
                        f"sweep.{axis}[{j}]", f"{err.describe()} (router {r['name']!r}, {r['path']})"
                    ) from None


def _check_matched_widths(ctx: GridContext, grid: dict) -> None:
    """A router entry sets ``moe.d_hidden`` only with ``match: none``: matching sets the width."""
    for r in grid["routers"]:
        mode = r["match"] or grid["match"]["mode"]
        if mode != "none" and "d_hidden" in r["moe"]:
            raise ctx.error(
                f"{r['path']}.moe.d_hidden",
                f"with match: {mode} the width is set "
                f"by matching; remove it (or use match: none to set "
                f"widths by hand)",
            )


def tasks_per_node(ex: dict) -> int:
    """Processes per job: ``executor.tasks_per_node``, else one per GPU, else 1."""
    return int(ex.get("tasks_per_node") or ex.get("gpus_per_node") or 1)


def _check_tasks(ctx: GridContext, grid: dict) -> None:
    """Data parallel: one GPU per process, and every global batch split evenly over the processes
    (refused here, naming the key, rather than in the first job an hour later)."""
    ex = grid["executor"]
    tasks, gpus = tasks_per_node(ex), ex.get("gpus_per_node") or 0
    if gpus and ex.get("tasks_per_node") and tasks != gpus:
        raise ctx.error(
            "executor.tasks_per_node",
            f"is {tasks} but gpus_per_node is {gpus}: data parallel runs "
            f"one process per GPU; set tasks_per_node: {gpus} or remove it",
        )
    if tasks > 1 and int(ex.get("runs_per_job") or 1) > 1:
        raise ctx.error(
            "executor.runs_per_job",
            f"is {ex['runs_per_job']} but a job runs data parallel over {tasks} processes; "
            f"several runs per job are for small single-process runs: set runs_per_job: 1",
        )
    if tasks == 1:
        return
    sources = [grid["train"]] + [b[k] or {} for b in grid["tasks"] for k in ("train", "preset_train")]
    sizes = {t.get("batch_size") for t in sources}
    sizes |= {v for axis, values in grid["sweep"] if axis == "train.batch_size" for v in values}
    for bs in sorted(s for s in sizes if isinstance(s, int)):
        if bs % tasks:
            raise ctx.error(
                "executor.tasks_per_node",
                f"{tasks} processes cannot share train.batch_size {bs} "
                f"(the global batch) evenly; use a batch size that is a "
                f"multiple of {tasks}, or another tasks_per_node",
            )


def _check_task(ctx: GridContext, name: str, path: str) -> None:
    from moebench.core.registry import TASKS, UnknownNameError

    try:
        TASKS.get(name)
    except UnknownNameError as err:
        raise ctx.error(path, str(err)) from None


def _preset(ctx: GridContext, task: str, size, path: str) -> dict:
    """A task's named preset (``Task.preset(size)``, a `moebench.core.task.Preset`); the grid
    file's own values override it, so a preset only fills in what the grid leaves out."""
    empty: dict[str, dict] = {"task_args": {}, "model": {}, "moe": {}, "train": {}}
    if size is None:
        return empty
    ctx.check(size, _STR, path)
    from moebench.core.registry import TASKS

    cls = TASKS.get(task)
    if not getattr(cls, "presets", None):
        raise ctx.error(
            path, f"task {task!r} defines no presets; remove `preset:` and give task_args / model / train explicitly"
        )
    try:
        preset = cls.preset(size)
    except (ValueError, KeyError, TypeError) as err:
        raise ctx.error(path, str(err)) from None
    out = {
        "task_args": dict(preset.task_args),
        "model": dict(preset.model),
        "moe": dict(preset.moe),
        "train": dict(preset.train),
    }
    out["moe"] = {k: v for k, v in out["moe"].items() if k in MOE_KEYS}
    _check_moe(ctx, out["moe"], f"{path} ({task} preset {size!r}: moe)")
    out["train"] = _check_train(ctx, out["train"], f"{path} ({task} preset {size!r}: train)")
    return out


def _check_router_name(ctx: GridContext, name: str, path: str) -> None:
    from moebench.core.registry import ROUTERS, UnknownNameError

    if name == DENSE:
        return
    try:
        ROUTERS.get(name)
    except UnknownNameError as err:
        raise ctx.error(path, f"{err} (or `dense` for the model without MoE)") from None


def _check_moe(ctx: GridContext, value, path: str) -> dict:
    return ctx.section(MoEConfig, value, path)


def _check_train(ctx: GridContext, value, path: str) -> dict:
    return ctx.section(TrainConfig, value, path)


def _check_pretrain(ctx: GridContext, value, path: str) -> dict | None:
    if isinstance(value, dict):
        ctx.keys(value, TRAIN_KEYS, path)
    try:
        return check_pretrain(copy.deepcopy(value), path)
    except ConfigError as err:
        raise ctx.error(err.path, err.describe()) from None


def _check_routers(ctx: GridContext, value) -> list[dict]:
    if value is None:
        raise ctx.error("routers", "missing: list the routers to compare, e.g. [dense, softmax-topk, switch]")
    ctx.check(
        value, ("a non-empty list of router names or mappings", lambda v: isinstance(v, list) and len(v) > 0), "routers"
    )
    out: list[dict] = []
    labels: dict[str, Any] = {}
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
        for key in LAYER_FILLED_ARGS:
            if key in args:
                raise ctx.error(
                    f"{path}.args.{key}",
                    f"set by the layer, not the router; use {path}.moe.num_experts / the model section instead",
                )
        label = _check_label(ctx, entry.get("label") or _default_label(entry["name"], args), labels, path)
        labels[label] = i
        match = _check_entry_match(ctx, entry, path)
        out.append(
            {
                "name": entry["name"],
                "label": label,
                "args": copy.deepcopy(args),
                "moe": moe,
                "path": path,
                "match": match,
            }
        )
    return out


def _check_label(ctx: GridContext, label, labels: dict[str, Any], path: str) -> str:
    ctx.check(
        label,
        (
            "a folder-safe name (letters, digits and . _ + = -, starting with a letter or digit)",
            lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", v),
        ),
        f"{path}.label",
    )
    if label in labels:
        raise ctx.error(
            f"{path}.label",
            f"label {label!r} is already used by routers[{labels[label]}]; "
            f"labels name a row of the report, give this entry its own `label:`",
        )
    return label


def _check_entry_match(ctx: GridContext, entry: dict, path: str):
    """A router entry's own ``match:`` (None: the grid's)."""
    match = entry.get("match")
    if match is not None:
        if entry["name"] == DENSE:
            raise ctx.error(f"{path}.match", "`dense` is not matched (it keeps the model's own MLP width); remove it")
        if match not in MATCH_MODES:
            close = difflib.get_close_matches(str(match), MATCH_MODES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ctx.error(
                f"{path}.match",
                f"expected one of {', '.join(MATCH_MODES)} (this entry's matching, "
                f"overriding the grid's match), got {match!r}{hint}",
            )
    return match


def _router_options(name: str) -> list[str] | None:
    """The keyword options a router takes: its declared ``options`` (`Router.options`), else its
    constructor's keyword parameters (None if it takes any: ``**kwargs``)."""
    import inspect

    from moebench.core.registry import ROUTERS

    cls = ROUTERS.get(name)
    if cls.options:
        return list(cls.options)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n in params if n != "self" and n not in LAYER_FILLED_ARGS]


def _check_router_args(ctx: GridContext, name: str, args: dict, path: str) -> None:
    """A router entry's args: known options (closest one named), each value checked against the router's
    declaration (`moebench.core.config.check_options`, the check its constructor runs too). The args
    stay as written: the run spec (and its id) records them, not the normalised values."""
    if name == DENSE:
        return
    from moebench.core.registry import ROUTERS

    known = _router_options(name)
    if known is None:
        return
    found = first_unknown({k: v for k, v in args.items() if k not in LAYER_FILLED_ARGS}, known)
    if found:
        key, close = found
        hint = f"; did you mean {close!r}?" if close else ""
        raise ctx.error(f"{path}.{key}", f"router {name!r} has no option {key!r}{hint} Its options: {', '.join(known)}")
    try:
        check_options(ROUTERS.get(name).options, copy.deepcopy(args), path)
    except ConfigError as err:
        raise ctx.error(err.path, err.describe()) from None


def _default_label(name: str, args: dict) -> str:
    """``name`` or ``name+key=value+...``: a folder-safe name (see moebench.training.spec)."""
    if not args:
        return name
    text = name + "".join(f"+{k}={format_value(v)}" for k, v in sorted(args.items()))
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", text)


def format_value(v) -> str:
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _check_sweep(ctx: GridContext, value) -> list[tuple[str, list]]:
    sweep = ctx.mapping(value, "sweep")
    axes = []
    for axis, values in sweep.items():
        path = f"sweep.{axis}"
        parts = str(axis).split(".")
        if len(parts) < 2 or parts[0] not in SWEEP_PREFIXES or not all(parts):
            close = difflib.get_close_matches(parts[0], SWEEP_PREFIXES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close and close[0] != parts[0] else ""
            raise ctx.error(
                path,
                f"an axis is a dotted path starting with one of {', '.join(SWEEP_PREFIXES)} "
                f"(e.g. moe.num_experts, router_args.top_k){hint}",
            )
        ctx.check(values, ("a non-empty list of values", lambda v: isinstance(v, list) and len(v) > 0), path)
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ctx.error(path, f"values repeat ({values}); list each value once")
        if parts[0] in ("moe", "train"):
            if len(parts) != 2:
                raise ctx.error(path, f"{parts[0]} axes have one level, e.g. {parts[0]}.{parts[1]}")
            cls, known = (MoEConfig, MOE_KEYS) if parts[0] == "moe" else (TrainConfig, TRAIN_KEYS)
            ctx.keys({parts[1]: None}, known, parts[0] + " (sweep axis)")
            f = fields_of(cls)[parts[1]]
            for j, v in enumerate(values):
                try:
                    values[j] = coerce(f, v, f"{path}[{j}]")
                except ConfigError as err:
                    raise ctx.error(err.path, err.describe()) from None
        if parts[0] == "router_args" and len(parts) != 2:
            raise ctx.error(path, "router_args axes have one level, e.g. router_args.top_k")
        axes.append((str(axis), copy.deepcopy(values)))
    return axes


def _check_match(ctx: GridContext, value) -> dict:
    if isinstance(value, str):
        value = {"mode": value}
    ctx.check(
        value,
        (
            "one of active_flops, params, none, or a mapping {mode, reference_active_experts}",
            lambda v: isinstance(v, dict),
        ),
        "match",
    )
    ctx.keys(value, MATCH_KEYS, "match")
    mode = value.get("mode", "active_flops")
    if mode not in MATCH_MODES:
        close = difflib.get_close_matches(str(mode), MATCH_MODES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ctx.error(
            "match" if "reference_active_experts" not in value else "match.mode",
            f"expected one of {', '.join(MATCH_MODES)}, got {mode!r}{hint}",
        )
    ref = value.get("reference_active_experts", 2)
    ctx.check(ref, _POS_NUM, "match.reference_active_experts")
    return {"mode": mode, "reference_active_experts": ref}


# -- expansion ---------------------------------------------------------------------------------------
