"""FLOP / parameter matching and cost counting: each MoE run's expert width, and what ``grid show``
prints per run (see the matching rules in ``moebench.grids.schema``'s docstring)."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from moebench.grids.schema import REFERENCE_ROUTER, WIDTH_MULTIPLE, GridContext, GridError


@functools.cache
def _probe_cached(key: str) -> dict:
    from moebench.core.registry import TASKS

    cfg = json.loads(key)
    moe = {
        "blocks": cfg["blocks"],
        "num_experts": cfg["num_experts"],
        "router": REFERENCE_ROUTER,
        "router_args": {"top_k": 1},
        "d_hidden": WIDTH_MULTIPLE,
        "capacity_factor": None,
        "upcycle": False,
        "mode": cfg.get("mode", "replace"),
    }
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
            from moebench.core.models import build_model
            from moebench.core.moefy import moefy

            note = (
                f"task {cfg['task']!r} could not build its model here ({type(err).__name__}: {err}); "
                f"measured from the model section alone"
            )
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

    from moebench.core.layer import moe_layers

    with torch.random.fork_rng():
        moe_model = build(moe)
        layers = [(n, m) for n, m in moe_model.named_modules() if m in set(moe_layers(moe_model))]
        if not layers:
            raise GridError(
                f"task {cfg['task']!r} built no MoE layer for moe.blocks={cfg['blocks']}; "
                f"check the block indices against the model's depth"
            )
        from moebench.core.cost import linear_flops_outside_moe

        moe_params = sum(p.numel() for _, m in layers for p in m.parameters())
        rest = sum(p.numel() for p in moe_model.parameters()) - moe_params
        rest_flops = linear_flops_outside_moe(moe_model)
        d_models = [m.d_model for _, m in layers]
        names = [n for n, _ in layers]
        del moe_model
        dense_model = build(None)
        modules = dict(dense_model.named_modules())
        dense_flops, dense_hidden = 0.0, []
        for n in names:
            n = n.replace(".moe_adapter.moe", ".mlp")  # adapter mode: the block's own MLP stays
            linears = [m for m in modules[n].modules() if isinstance(m, torch.nn.Linear)] if n in modules else []
            dense_flops += sum(2.0 * m.in_features * m.out_features for m in linears)
            dense_hidden.append(linears[0].out_features if linears else None)
        dense_total = sum(p.numel() for p in dense_model.parameters())
        dense_model_flops = linear_flops_outside_moe(dense_model)
    return {
        "d_models": d_models,
        "rest_params": rest,
        "dense_params": dense_total,
        "rest_flops": rest_flops,
        "dense_model_flops": dense_model_flops,
        "dense_mlp_flops": dense_flops,
        "dense_hidden": dense_hidden,
        "layer_names": names,
        "notes": notes,
    }


def _dense_width(spec: Mapping, ctx: GridContext) -> int:
    """The dense MLP width in the MoE blocks: what ``moe.d_hidden: null`` means (adapter mode: d / 4)."""
    if spec["moe"].get("mode") == "adapter":
        from moebench.core.adapter import adapter_width

        widths = {adapter_width(d, None) for d in probe(spec)["d_models"]}
        if len(widths) != 1:
            raise ctx.error(
                "moe.d_hidden",
                f"null means d / 4 in adapter mode, but the blocks have widths "
                f"{sorted(widths)}; set moe.d_hidden to an integer",
            )
        return widths.pop()
    widths = set(probe(spec)["dense_hidden"])
    if len(widths) != 1 or None in widths:
        raise ctx.error(
            "moe.d_hidden",
            f"null means the dense MLP's width, but the MLPs of blocks "
            f"{spec['moe']['blocks']} have widths {sorted(map(str, widths))}; "
            f"set moe.d_hidden to an integer",
        )
    return widths.pop()


def probe(spec: Mapping, blocks=None, ctx: GridContext | None = None) -> dict:
    """What the model around the MoE layers looks like: d_model of each MoE layer, parameters outside
    them, and the dense model's parameters and MLP FLOPs in the same blocks. Built once per
    (task, task_args, model, blocks) and cached, with a tiny expert width so it is cheap. ``blocks``
    places a dense spec's comparison (default: every block)."""
    moe = spec["moe"] or {}
    model = {k: v for k, v in spec["model"].items() if k not in ("pretrained", "pretrained_strict")}  # shapes only
    key = json.dumps(
        {
            "task": spec["task"],
            "task_args": spec["task_args"],
            "model": model,
            "blocks": moe.get("blocks", blocks if blocks is not None else "all"),
            "num_experts": moe.get("num_experts", 2),
            "mode": moe.get("mode", "replace"),
        },
        sort_keys=True,
    )
    try:
        return _probe_cached(key)
    except GridError:
        raise
    except Exception as err:  # noqa: BLE001 - any build failure is the grid's model/moe section
        ctx = ctx or GridContext("<grid>")
        raise ctx.error(
            "model / moe.blocks",
            f"cannot build task {spec['task']!r}'s model to measure it "
            f"(task_args={spec['task_args']}, model={spec['model']}, "
            f"moe.blocks={moe.get('blocks', blocks)}): "
            f"{type(err).__name__}: {err}",
        ) from None


def _router(name: str, d_model: int, num_experts: int, args: dict):
    from moebench.core.registry import ROUTERS

    return ROUTERS.get(name)(d_model=d_model, num_experts=num_experts, **copy.deepcopy(args))


def _image_level(name: str) -> bool:
    from moebench.core.registry import ROUTERS

    return bool(ROUTERS.get(name).image_level)


def _image_level_costs(spec: Mapping) -> dict:
    """An image-level model (ermoe-released): built for real (its parameters are E backbones, all of
    which run per image). mlp_flops/tok: every expert's MLPs in every block; router: the score."""
    from moebench.core.registry import TASKS

    model_cfg = {k: v for k, v in spec["model"].items() if k not in ("pretrained", "pretrained_strict")}
    import torch

    with torch.random.fork_rng():
        net = TASKS.get(spec["task"])(**spec["task_args"]).build_model(
            copy.deepcopy(model_cfg), copy.deepcopy(spec["moe"])
        )
    mlp = sum(
        2.0 * m.in_features * m.out_features
        for e in net.experts
        for blk in e.blocks
        for m in blk.mlp.modules()
        if isinstance(m, torch.nn.Linear)
    )
    tokens = (net.router.num_patches or 0) + net.prefix
    total = sum(p.numel() for p in net.parameters())
    router = net.router.flops_per_token() / max(tokens, 1)
    # every expert runs on every image: all E backbones' linear layers count (the report's definition)
    linear = sum(
        2.0 * m.in_features * m.out_features for e in net.experts for m in e.modules() if isinstance(m, torch.nn.Linear)
    )
    return {
        "params_total": int(total),
        "params_active": int(total),
        "mlp_flops_per_token": mlp,
        "router_flops_per_token": router,
        "flops_per_token": linear + router,
    }


def _width_fix(ref_width: int, ratios) -> str:
    """Reference widths near ``ref_width`` for which ``width * ratio`` is a multiple of 4 for every ratio."""

    def ok(w: int) -> bool:
        return all((Fraction(w) * r).denominator == 1 and (Fraction(w) * r) % WIDTH_MULTIPLE == 0 for r in ratios)

    good = [w for w in range(WIDTH_MULTIPLE, 4 * ref_width + 1, WIDTH_MULTIPLE) if ok(w)]
    good.sort(key=lambda w: (abs(w - ref_width), w))
    return ", ".join(str(w) for w in sorted(good[:3])) or "none near it"


@dataclass
class Draft:
    """One run of the grid before it is resolved: its spec dict (matching sets its ``moe.d_hidden`` and
    ``match``) and what matching needs to know about the grid entry it comes from."""

    spec: dict
    where: str  # the task block and router entry, for messages: "tasks[0], routers[2]"
    router_path: str  # the router entry ("routers[2]"): an option it refuses names its key
    match_mode: str | None  # the router entry's own ``match``; None: the grid's
    ref_num_experts: int | None  # the block's num_experts, the reference of params matching


@dataclass
class _Plan:
    """One MoE run's matching, decided before any width is set (the fix names widths for every run)."""

    spec: dict
    ratio: Fraction  # its expert width over the reference width
    active: Fraction  # experts per token (routed + shared)
    routers: list  # one probe router per MoE layer
    probed: dict  # `probe`'s answer
    reference: dict | None
    why: str
    where: str
    mode: str


def match_runs(g: dict, drafts: list[Draft], ctx: GridContext) -> None:
    """Set every MoE run's ``moe.d_hidden`` by the grid's (or its router entry's) match mode and record
    how in ``match``; dense and image-level runs get a note. Errors name the grid key to change."""
    plans = [p for d in drafts if (p := _plan(g, d, ctx)) is not None]
    all_ratios = {p.ratio for p in plans}
    for p in plans:
        _apply(p, all_ratios, ctx)
    _check_upcycled_widths(g, [d.spec for d in drafts], ctx)


def _plan(g: dict, draft: Draft, ctx: GridContext) -> _Plan | None:
    spec = draft.spec
    where = f"run {spec['label']!r} ({draft.where}, sweep {spec['sweep'] or '{}'})"
    moe = spec["moe"]
    mode = draft.match_mode or g["match"]["mode"]  # a router entry's own match: overrides the grid's
    if moe is None:
        spec["match"] = {"mode": mode, "dense": "keeps the model's own MLP width (not rescaled)"}
        return None
    if _image_level(moe["router"]):
        spec["match"] = {
            "mode": mode,
            "note": f"{moe['router']}: every expert is a whole backbone copy, run "
            f"on every image; not width-matched (moe.d_hidden unused)",
        }
        return None
    pr = probe(spec, ctx=ctx)
    if moe["d_hidden"] is None:
        moe["d_hidden"] = _dense_width(spec, ctx)
    routers = _probe_routers(spec, pr, ctx, draft.router_path)
    a = Fraction(routers[0].active_experts_per_token).limit_denominator(1000)
    a += moe.get("shared_experts", 0)  # always-on experts cost as much as routed ones
    ratio, reference, why = _ratio(g, spec, mode, a, draft.ref_num_experts)
    return _Plan(spec, ratio, a, routers, pr, reference, why, where, mode)


def _probe_routers(spec: dict, pr: dict, ctx: GridContext, router_path: str) -> list:
    """The run's router at each MoE layer's width; an option the router refuses names its grid key."""
    moe = spec["moe"]
    try:
        return [
            _router(moe["router"], d, moe["num_experts"] + moe.get("null_experts", 0), moe["router_args"])
            for d in pr["d_models"]
        ]
    except (TypeError, ValueError) as err:
        named = [k for k in moe["router_args"] if re.search(rf"\b{re.escape(str(k))}\b", str(err))]
        origin = {
            k: (f"sweep.router_args.{k}" if f"router_args.{k}" in spec["sweep"] else f"{router_path}.args.{k}")
            for k in moe["router_args"]
        }
        path = origin[named[0]] if named else f"{router_path}.args"
        raise ctx.error(
            path,
            f"router {moe['router']!r} rejects its options {moe['router_args']} "
            f"(num_experts={moe['num_experts']}): {err}",
        ) from None


def _ratio(
    g: dict, spec: dict, mode: str, a: Fraction, ref_num_experts: int | None
) -> tuple[Fraction, dict | None, str]:
    """(expert width / reference width, the reference, why in words) for ``mode``; params matching
    compares with ``ref_num_experts`` (the block's num_experts; default: the run's own)."""
    moe = spec["moe"]
    ref_width = moe["d_hidden"]
    if mode == "active_flops":
        ref_a = Fraction(g["match"]["reference_active_experts"]).limit_denominator(1000)
        ratio = ref_a / (a * _gated_factor(moe))
        reference = {"router": REFERENCE_ROUTER, "active_experts": float(ref_a), "d_hidden": ref_width}
        return (
            ratio,
            reference,
            (
                f"it runs {float(a):g} experts per token{_gated_why(moe)}, so its experts are "
                f"{float(ratio):g} x the reference width {ref_width} (reference: {float(ref_a):g} "
                f"experts per token)"
            ),
        )
    if mode == "params":
        ref_e = ref_num_experts or moe["num_experts"]
        ratio = Fraction(ref_e, moe["num_experts"])
        return (
            ratio,
            {"num_experts": ref_e, "d_hidden": ref_width},
            (
                f"it has {moe['num_experts']} experts, so each is {float(ratio):g} x the reference width "
                f"{ref_width} (reference: {ref_e} experts)"
            ),
        )
    return Fraction(1), None, ""


def _apply(p: _Plan, all_ratios: set, ctx: GridContext) -> None:
    """Set the run's width (refusing one off the grouped GEMM's alignment) and its ``match`` record."""
    spec, moe = p.spec, p.spec["moe"]
    ref_width = moe["d_hidden"]
    width = Fraction(ref_width) * p.ratio
    if p.mode != "none" and (width.denominator != 1 or width % WIDTH_MULTIPLE != 0):
        raise ctx.error(
            "moe.d_hidden",
            f"cannot match {p.where}: {p.why}, which gives {float(width):g}, not an "
            f"integer multiple of {WIDTH_MULTIPLE} (the grouped GEMM's alignment). "
            f"Fix: set moe.d_hidden to one of {_width_fix(ref_width, all_ratios)} "
            f"(these work for every run of the grid), or drop this router, "
            f"or use match: none",
        )
    moe["d_hidden"] = int(width)
    d_models = p.probed["d_models"]
    bias = 0 if moe.get("mode") == "adapter" else 1  # adapter experts have no biases
    spec["match"] = {
        "mode": p.mode,
        "reference": p.reference,
        "active_experts_per_token": float(p.active),
        "d_hidden": int(width),
        "expert_flops_per_token": float(
            sum(float(p.active * _gated_factor(moe)) * 4 * d * int(width) for d in d_models)
        ),
        "expert_params": int(
            sum(
                moe["num_experts"] * _expert_params(d, int(width), moe, bias)
                + (_expert_params(d, moe["shared_experts"] * int(width), moe, bias) if moe.get("shared_experts") else 0)
                for d in d_models
            )
        ),
        "router_flops_per_token": float(sum(r.flops_per_token() for r in p.routers)),
        "moe_layers": len(d_models),
        "note": "router FLOPs are reported, not matched"
        if p.mode == "active_flops"
        else (
            "expert biases and router-specific extras are reported, not matched"
            if p.mode == "params"
            else "widths as given"
        ),
    }


def _check_upcycled_widths(g: dict, specs: list[dict], ctx: GridContext) -> None:
    upcycled = [s for s in specs if s["moe"] and s["moe"]["upcycle"]]
    widths = {s["moe"]["d_hidden"] for s in upcycled}
    if len(widths) > 1:
        raise ctx.error(
            "moe.upcycle",
            f"upcycle: true copies the dense MLP into every expert, so every run "
            f"needs the same expert width, but matching ({g['match']['mode']}) gives "
            f"widths {sorted(widths)}; use match: none, or routers with the same active "
            f"experts",
        )


def _gated_factor(moe: dict) -> Fraction:
    """A gated (swiglu / geglu) expert has three d x h matrices, not two: 3/2 the FLOPs at equal width."""
    return Fraction(3, 2) if moe.get("activation") in ("swiglu", "geglu") else Fraction(1)


def _expert_params(d: int, width: int, moe: dict, bias: int = 1) -> int:
    """fc1 (2 * width wide when gated) and fc2, with biases unless ``bias`` is 0 (adapter experts)."""
    fc1 = 2 * width if _gated_factor(moe) != 1 else width
    return d * fc1 + width * d + bias * (fc1 + d)


def _gated_why(moe: dict) -> str:
    return f" of gated {moe['activation']} experts (3/2 the FLOPs at equal width)" if _gated_factor(moe) != 1 else ""


# -- costs for `grid show` ---------------------------------------------------------------------------
def costs(spec: Mapping, blocks=None) -> dict:
    """Parameters and FLOPs per token of the MoE sub-layers of one run, building only its MoE layers
    (the rest of the model is identical across a grid's runs and comes from the cached probe).
    For the dense baseline, ``blocks`` says which blocks' MLPs to count (those the MoE runs replace)."""
    pr = probe(spec, blocks)
    if spec["moe"] is None:
        return {
            "params_total": pr["dense_params"],
            "params_active": pr["dense_params"],
            "mlp_flops_per_token": pr["dense_mlp_flops"],
            "router_flops_per_token": 0.0,
            "flops_per_token": pr["dense_model_flops"],
            "dense_hidden": "/".join(sorted({str(h) for h in pr["dense_hidden"]})),
        }
    moe = dict(spec["moe"])
    if _image_level(moe["router"]):
        return _image_level_costs(spec)
    if moe["d_hidden"] is None:
        moe["d_hidden"] = _dense_width(spec, GridContext("<spec>"))
    out = dict(_moe_costs(json.dumps({"d_models": pr["d_models"], "moe": moe}, sort_keys=True), pr["rest_params"]))
    if moe.get("mode") == "adapter":  # the dense MLPs stay: the branch adds to their work
        out["mlp_flops_per_token"] += pr["dense_mlp_flops"]
    out["flops_per_token"] = pr["rest_flops"] + out["mlp_flops_per_token"]  # = final.json's cost.flops_per_token
    return out


@functools.cache
def _moe_costs(key: str, rest_params: int) -> dict:
    """Counts do not depend on weight values, so the layers are built on the meta device (no memory,
    no init work such as ERMoE's SVD); a router that cannot be built there is built on the CPU."""
    import torch

    from moebench.core.adapter import build_adapter_layer
    from moebench.core.layer import MoELayer

    cfg = json.loads(key)
    moe = cfg["moe"]
    total = active = flops = router_flops = 0.0
    adapter = moe.get("mode") == "adapter"
    for d in cfg["d_models"]:

        def build(d=d):
            if adapter:
                return build_adapter_layer(
                    d, moe["d_hidden"], moe["num_experts"], moe["router"], moe["router_args"], moe["capacity_factor"]
                )
            return MoELayer(
                d,
                moe["d_hidden"],
                moe["num_experts"],
                moe["router"],
                moe["router_args"],
                moe["capacity_factor"],
                activation=moe.get("activation") or "gelu",
                shared_experts=moe.get("shared_experts", 0),
                shared_expert_gate=moe.get("shared_expert_gate", False),
                null_experts=moe.get("null_experts", 0),
            )

        try:
            with torch.device("meta"):
                layer = build()
        except (RuntimeError, NotImplementedError):
            with torch.random.fork_rng():
                layer = build()
        total += sum(p.numel() for p in layer.parameters())  # an adapter's alpha is in rest_params
        active += layer.active_params()
        flops += layer.flops_per_token()
        router_flops += layer.router.flops_per_token()
        del layer
    return {
        "params_total": int(rest_params + total),
        "params_active": int(rest_params + active),
        "mlp_flops_per_token": flops,
        "router_flops_per_token": router_flops,
    }
