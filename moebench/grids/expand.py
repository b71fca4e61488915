"""Expansion: a validated grid -> its deterministic list of resolved, matched run specs (order: task
block, sweep point, router entry, seed). Matching itself lives in ``moebench.grids.matching``."""
from __future__ import annotations

import copy
import itertools
import json
import os

from moebench.grids.matching import match_runs
from moebench.grids.pretrain import dependent_model, pretrain_spec, reference
from moebench.grids.schema import DENSE, MOE_KEYS, GridContext, load


def _set_path(d: dict, dotted: list[str], value) -> None:
    for key in dotted[:-1]:
        nxt = d.get(key)
        if not isinstance(nxt, dict):
            nxt = d[key] = {}
        d = nxt
    d[dotted[-1]] = copy.deepcopy(value)


def _merged_train(grid: dict, block: dict) -> dict:
    from moebench.training.spec import DEFAULT_TRAIN

    return {**copy.deepcopy(DEFAULT_TRAIN), **block["preset_train"], **grid["train"], **block["train"]}


def expand(grid: str | os.PathLike | dict) -> list[dict]:
    """The grid's runs as resolved, matched spec dicts, in a fixed order: task block, sweep point
    (axes in file order), router entry, seed. Deterministic: the same file gives the same list, wherever
    the results go (a run that starts from a pretrain names it by run id, not by path)."""
    return expand_with_pretrain(grid)[0]


def expand_with_pretrain(grid: str | os.PathLike | dict) -> tuple[list[dict], list[dict]]:
    """``expand``'s runs, plus the dense pretraining runs they depend on, as ``[{"spec", "ref"}]`` where
    ``ref`` is what the dependants' ``model.pretrained`` says (one per task block, sweep point of
    task_args / model, and seed; see ``moebench.grids.pretrain``)."""
    g = grid if isinstance(grid, dict) and "tasks" in grid and "file" in grid else load(grid)
    ctx = GridContext(g["file"])
    from moebench.training.spec import run_id

    axes = g["sweep"]
    points = list(itertools.product(*[[(a, v) for v in vals] for a, vals in axes])) if axes else [()]
    specs: list[dict] = []
    seen: dict[str, bool] = {}
    pretrains: dict[str, dict] = {}
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
                    from moebench.training.spec import DEFAULT_MOE

                    moe = {**{k: DEFAULT_MOE[k] for k in MOE_KEYS}, **moe}
                    moe_spec = {
                        "blocks": copy.deepcopy(moe["blocks"]),
                        "num_experts": moe["num_experts"],
                        "router": router["name"],
                        "router_args": router_args,
                        "d_hidden": moe.get("d_hidden"),
                        "capacity_factor": moe.get("capacity_factor"),
                        "upcycle": bool(moe.get("upcycle", False)),
                        **{k: copy.deepcopy(moe[k]) for k in MOE_KEYS
                           if k not in ("blocks", "num_experts", "d_hidden", "capacity_factor", "upcycle")},
                    }
                    moe_spec.update({k: copy.deepcopy(moe[k]) for k in MOE_KEYS if k not in moe_spec})
                for seed in g["seeds"]:
                    run_model = copy.deepcopy(model)
                    if block["pretrain"] is not None:
                        ref = _pretrain_for(ctx, block, task_args, model, seed, _merged_train(g, block), pretrains)
                        run_model = dependent_model(model, ref)
                    spec = {
                        "grid": g["name"],
                        "task": block["task"],
                        "task_args": copy.deepcopy(task_args),
                        "model": run_model,
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
                    specs.append({"_where": where, "_router_path": router["path"], "_match_mode": router.get("match"),
                                  "_ref_e": {**block["preset_moe"], **g["moe"], **block["moe"]}.get("num_experts"),
                                  **spec})
    match_runs(g, specs, ctx)
    out = []
    for spec in specs:
        for key in ("_where", "_router_path", "_ref_e", "_match_mode"):
            spec.pop(key)
        out.append(_finalise(spec, ctx))
    ids: dict[str, str] = {}
    for spec in out:
        rid = run_id(spec)
        if rid in ids:
            raise ctx.error("routers", f"two runs resolve to the same spec (run id {rid}): labels "
                                       f"{ids[rid]!r} and {spec['label']!r}; make the entries differ")
        ids[rid] = spec["label"]
    return out, list(pretrains.values())


def _pretrain_for(ctx: GridContext, block: dict, task_args: dict, model: dict, seed: int, train: dict,
                  pretrains: dict) -> str:
    """The reference to the block's dense pretraining run for this seed (recorded once in ``pretrains``)."""
    from moebench.training.spec import SpecError

    try:
        spec = pretrain_spec(block["task"], task_args, model, seed, train, block["pretrain"])
    except SpecError as err:
        raise ctx.error(f"{block['path']}: pretrain (seed {seed})", str(err)) from None
    ref = reference(spec)
    pretrains.setdefault(ref, {"spec": spec, "ref": ref})
    return ref


def _finalise(spec: dict, ctx: GridContext) -> dict:
    """Apply the spec module's defaults / validation, naming the grid file in any error."""
    from moebench.training.spec import SpecError, resolve_spec

    try:
        return resolve_spec(spec)
    except SpecError as err:
        raise ctx.error(f"run {spec['label']!r} seed {spec['seed']}", str(err)) from None


# -- matching ----------------------------------------------------------------------------------------
