"""Expansion: a validated grid -> its deterministic list of resolved, matched run specs (order: task
block, sweep point, router entry, seed). Matching itself lives in ``moebench.grids.matching``."""

from __future__ import annotations

import copy
import itertools
import json
import os

from moebench.grids.matching import Draft, match_runs
from moebench.grids.pretrain import dependent_model, pretrain_spec, reference
from moebench.grids.schema import DENSE, MOE_KEYS, GridContext, load
from moebench.training.spec import RunSpec


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


def expand(grid: str | os.PathLike | dict) -> list[RunSpec]:
    """The grid's runs as resolved, matched `RunSpec`s, in a fixed order: task block, sweep point
    (axes in file order), router entry, seed. Deterministic: the same file gives the same list, wherever
    the results go (a run that starts from a pretrain names it by run id, not by path)."""
    return expand_with_pretrain(grid)[0]


def expand_with_pretrain(grid: str | os.PathLike | dict) -> tuple[list[RunSpec], list[RunSpec]]:
    """``expand``'s runs, plus the dense pretraining runs they depend on (one per task block, sweep point
    of task_args / model, and seed); a dependant's ``model.pretrained`` is ``pretrain.reference(spec)`` of
    its pretrain (see ``moebench.grids.pretrain``)."""
    g = grid if isinstance(grid, dict) and "tasks" in grid and "file" in grid else load(grid)
    ctx = GridContext(g["file"])
    axes = g["sweep"]
    points = list(itertools.product(*[[(a, v) for v in vals] for a, vals in axes])) if axes else [()]
    drafts: list[Draft] = []
    seen: set[str] = set()
    pretrains: dict[str, RunSpec] = {}  # reference -> the dense pretraining run
    for block in g["tasks"]:
        for point in points:
            for router in g["routers"]:
                sections = _sections(g, block, router, point, ctx)
                for seed in g["seeds"]:
                    spec = _seed_spec(g, block, router, sections, seed, ctx, pretrains)
                    key = json.dumps(spec, sort_keys=True)
                    if key in seen:
                        continue  # the dense baseline under a moe/router_args axis: one run, not one per value
                    seen.add(key)
                    drafts.append(_draft(g, block, router, spec))
    match_runs(g, drafts, ctx)
    out = [_finalise(d.spec, ctx) for d in drafts]
    _check_unique_ids(out, ctx)
    return out, list(pretrains.values())


def _draft(g: dict, block: dict, router: dict, spec: dict) -> Draft:
    """The unresolved ``spec`` with what matching reads about its grid entry."""
    where = router["path"] if block["path"] == "(top level)" else f"{block['path']}, {router['path']}"
    return Draft(
        spec=spec,
        where=where,
        router_path=router["path"],
        match_mode=router.get("match"),
        ref_num_experts={**block["preset_moe"], **g["moe"], **block["moe"]}.get("num_experts"),
    )


def _sections(g: dict, block: dict, router: dict, point: tuple, ctx: GridContext) -> dict:
    """One (task block, sweep point, router entry): its task_args, model, train, moe sections and the
    sweep values that apply (the moe / router_args axes do not exist for the dense model)."""
    dense = router["name"] == DENSE
    out = {
        "sweep": {},
        "task_args": copy.deepcopy(block["task_args"]),
        "model": copy.deepcopy(block["model"] if block["model"] is not None else {}),  # {}: the task's default
        "train": _merged_train(g, block),
    }
    moe = {**block["preset_moe"], **g["moe"], **block["moe"], **router["moe"]}
    router_args = copy.deepcopy(router["args"])
    for axis, value in point:
        head, *rest = axis.split(".")
        if dense and head in ("moe", "router_args"):
            continue
        out["sweep"][axis] = copy.deepcopy(value)
        if head in ("moe", "router_args"):
            own = router["moe"] if head == "moe" else router["args"]
            if rest[0] in own:
                raise ctx.error(
                    f"{router['path']}.{'moe' if head == 'moe' else 'args'}.{rest[0]}",
                    f"also swept by sweep.{axis}; remove one of the two",
                )
            (moe if head == "moe" else router_args)[rest[0]] = copy.deepcopy(value)
        elif head == "train":
            out["train"][rest[0]] = copy.deepcopy(value)
        else:
            _set_path(out["task_args"] if head == "task_args" else out["model"], rest, value)
    out["moe"] = None if dense else _moe_spec(router["name"], moe, router_args)
    return out


def _moe_spec(name: str, moe: dict, router_args: dict) -> dict:
    """A run's moe section: the grid's moe keys over their defaults, with the router and its options."""
    from moebench.training.spec import DEFAULT_MOE

    moe = {**{k: DEFAULT_MOE[k] for k in MOE_KEYS}, **moe}
    spec = {
        "blocks": copy.deepcopy(moe["blocks"]),
        "num_experts": moe["num_experts"],
        "router": name,
        "router_args": router_args,
        "d_hidden": moe.get("d_hidden"),
        "capacity_factor": moe.get("capacity_factor"),
        "upcycle": moe.get("upcycle", False),
        **{
            k: copy.deepcopy(moe[k])
            for k in MOE_KEYS
            if k not in ("blocks", "num_experts", "d_hidden", "capacity_factor", "upcycle")
        },
    }
    spec.update({k: copy.deepcopy(moe[k]) for k in MOE_KEYS if k not in spec})
    return spec


def _seed_spec(
    g: dict, block: dict, router: dict, sections: dict, seed: int, ctx: GridContext, pretrains: dict
) -> dict:
    """The unresolved spec of one seed; a block with ``pretrain:`` makes its model start from the
    pretrain of this seed (recorded in ``pretrains``)."""
    model = sections["model"]
    run_model = copy.deepcopy(model)
    if block["pretrain"] is not None:
        ref = _pretrain_for(ctx, block, sections["task_args"], model, seed, _merged_train(g, block), pretrains)
        run_model = dependent_model(model, ref)
    return {
        "grid": g["name"],
        "task": block["task"],
        "task_args": copy.deepcopy(sections["task_args"]),
        "model": run_model,
        "moe": copy.deepcopy(sections["moe"]),
        "label": router["label"],
        "seed": seed,
        "train": copy.deepcopy(sections["train"]),
        "sweep": copy.deepcopy(sections["sweep"]),
        "match": None,
    }


def _check_unique_ids(specs: list[RunSpec], ctx: GridContext) -> None:
    ids: dict[str, str] = {}
    for spec in specs:
        rid = spec.run_id
        if rid in ids:
            raise ctx.error(
                "routers",
                f"two runs resolve to the same spec (run id {rid}): labels "
                f"{ids[rid]!r} and {spec.label!r}; make the entries differ",
            )
        ids[rid] = str(spec.label)


def _pretrain_for(
    ctx: GridContext, block: dict, task_args: dict, model: dict, seed: int, train: dict, pretrains: dict
) -> str:
    """The reference to the block's dense pretraining run for this seed (recorded once in ``pretrains``)."""
    from moebench.training.spec import SpecError

    try:
        spec = pretrain_spec(block["task"], task_args, model, seed, train, block["pretrain"])
    except SpecError as err:
        raise ctx.error(f"{block['path']}: pretrain (seed {seed})", str(err)) from None
    ref = reference(spec)
    pretrains.setdefault(ref, spec)
    return ref


def _finalise(spec: dict, ctx: GridContext) -> RunSpec:
    """The run's `RunSpec` (the spec module's defaults and validation), naming the grid file in any error."""
    from moebench.training.spec import SpecError

    try:
        return RunSpec.from_dict(spec)
    except SpecError as err:
        raise ctx.error(f"run {spec['label']!r} seed {spec['seed']}", str(err)) from None


# -- matching ----------------------------------------------------------------------------------------
