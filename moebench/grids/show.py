"""``moebench grid show``: one row per expanded run with its matched width and costs."""

from __future__ import annotations

import os

from moebench.core.progress import Progress
from moebench.grids.expand import expand_with_pretrain
from moebench.grids.matching import costs, probe
from moebench.grids.pretrain import DEFAULT_RESULTS, reference
from moebench.grids.schema import REFERENCE_ROUTER, GridContext, format_value, load
from moebench.training.pretrained import weights_of


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


_COST_COLUMNS = ["d_hidden", "flops/tok", "mlp_flops/tok", "router_flops/tok", "params", "active_params"]


def _title(g: dict, n_runs: int) -> str:
    """The grid, its file, how many runs and how they are matched."""
    return f"grid {g['name']} ({g['file']}): {n_runs} runs, match: {g['match']['mode']}" + (
        f" (reference: {REFERENCE_ROUTER} top-{g['match']['reference_active_experts']:g} at the grid's d_hidden)"
        if g["match"]["mode"] == "active_flops"
        else ""
    )


def _footer(g: dict) -> list[str]:
    """What the cost columns measure."""
    lines: list[str] = []
    lines.append(
        "flops/tok: the whole model's estimated forward FLOPs per token, the report's FLOPs/token: "
        "2 x the weights of every linear layer outside the MoE layers, plus the experts a token "
        "visits and the router (attention scores, convolutions and elementwise ops not counted)."
    )
    lines.append(
        "mlp_flops/tok: the part of flops/tok in the MoE blocks' MLP sub-layers (experts + router; the "
        "dense MLP for dense), where runs differ; router_flops/tok: the router's share of it."
    )
    if g["match"]["mode"] == "active_flops":
        lines.append("Router FLOPs are reported, not matched. The dense baseline keeps the model's own MLP width.")
    return lines


def show(grid: str | os.PathLike | dict) -> str:
    """The table `moebench grid show` prints: one row per run with its matched width and costs."""
    g = load(grid) if not (isinstance(grid, dict) and "file" in grid) else grid
    specs, pretrains = expand_with_pretrain(g)
    axes = [a for a, _ in g["sweep"]]
    head = ["run_id", "task", "label", "seed", *axes, *_COST_COLUMNS]
    rows = []
    bar = Progress(len(specs), f"grid {g['name']}: costing runs", every_s=5, unit="run")
    for spec in specs:
        same = [s for s in specs if s.moe and (s.task, s.task_args, s.model) == (spec.task, spec.task_args, spec.model)]
        c = costs(spec, blocks=same[0]["moe"]["blocks"] if same else None)
        rows.append(
            [
                spec.run_id,
                spec["task"],
                spec["label"],
                str(spec["seed"]),
                *[format_value(spec["sweep"][a]) if a in spec["sweep"] else "-" for a in axes],
                str(spec["moe"]["d_hidden"]) if spec["moe"] else f"{c['dense_hidden']} (dense)",
                _human(c["flops_per_token"]),
                _human(c["mlp_flops_per_token"]),
                _human(c["router_flops_per_token"]),
                _human(c["params_total"]),
                _human(c["params_active"]),
            ]
        )
        bar.update()
    bar.close()
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = [
        _title(g, len(specs)),
        "  ".join(h.ljust(w) for h, w in zip(head, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if pretrains:
        lines.append(
            f"pretrain (run first, once per task block and seed; every run above with the same task and "
            f"seed starts from its weights): {len(pretrains)} dense runs; paths as under "
            f"`moebench run --results {DEFAULT_RESULTS}` (run ids do not depend on the results folder)"
        )
        for p in pretrains:
            lines.append(
                f"  {p.run_id}  {p['task']}  seed {p['seed']}  {p['train']['steps']} steps  "
                f"-> {weights_of(DEFAULT_RESULTS, reference(p))}"
            )
    notes = sorted({n for spec in specs if spec["moe"] for n in probe(spec, ctx=GridContext(g["file"]))["notes"]})
    lines += [f"note: {n}" for n in notes]
    lines += _footer(g)
    return "\n".join(lines)
