"""The per-task cost table: what a router costs on its own (parameters, FLOPs per token) next to the
whole model's, and the measured time per training step against the dense twin on the same device.

Why a table of its own: an eigen router's score can cost more than its experts, and a leaderboard that
shows only the model's FLOPs hides that; measured time catches what FLOP counts leave out (dispatch,
sorting, small kernels)."""

from __future__ import annotations

import math

import pandas as pd

from moebench.report.render import Table, slug
from moebench.report.tables import column_or_nan, fmt_value, si_scale

# (column, header, formatter kind)
COST_COLUMNS = [
    ("flops_per_token", "FLOPs/token ({p})", "si"),
    ("router_flops_per_token", "Router FLOPs/token ({p})", "si"),
    ("params_total", "Params ({p})", "si"),
    ("router_params", "Router params ({p})", "si"),
    ("ms_per_step", "ms / step", "auto"),
    ("step_ratio", "Step × dense", "f2"),
    ("tokens_per_s", "Tokens/s ({p})", "si"),
]


def cost_table(bench: str, b: pd.DataFrame) -> Table | None:
    """None when no run of the task recorded any of the cost columns (records older than them)."""
    b = b.reset_index(drop=True)
    shown = [c for c in COST_COLUMNS if c[0] in b and b[c[0]].notna().any()]
    if not any(key in ("router_params", "router_flops_per_token", "ms_per_step") for key, *_ in shown):
        return None
    show_variant = (b["variant"] != "").any()
    devices = sorted({d for ds in column_or_nan(b, "device").dropna() for d in str(ds).split(", ") if d})
    columns = ["Router"] + (["Sweep"] if show_variant else [])
    cells = [[r["label"]] + ([r["variant"]] if show_variant else []) for _, r in b.iterrows()]
    for key, header, kind in shown:
        vals = b[key].astype(float)
        scale = 1.0
        if kind == "si":
            scale, prefix = si_scale(vals.to_numpy(dtype=float))
            header = header.replace("{p}", prefix).replace(" ()", "")
        columns.append(header)
        for i, v in enumerate(vals):
            cells[i].append(fmt_value(v, kind, scale))
    if len(devices) > 1:
        columns.append("Device")
        for i, d in enumerate(column_or_nan(b, "device")):
            cells[i].append(d if isinstance(d, str) else "–")
    where = devices[0] if len(devices) == 1 else "the device in each row (ratios only within one device)"
    notes = [
        f"Router FLOPs/token and router params are the routers' own share (summed over MoE layers) of the "
        f"model's FLOPs per token and parameters (0 for dense). ms / step = measured wall time per "
        f"optimiser step (forward, backward, update, data loading; evaluation excluded), mean over the "
        f"run and over seeds, on {where}; Step × dense = that over the dense model's of the same task, "
        f"measured on the same device (– where there is no dense twin or the devices differ)."
    ]
    if math.isnan(column_or_nan(b, "step_ratio").max()) and "dense" not in set(b["label"]):
        notes.append("No dense run in this task, so no step ratio.")
    return Table(
        title=f"Cost: {bench}",
        columns=columns,
        rows=cells,
        notes=notes,
        label=f"tab:cost-{slug(bench)}",
        left=1 + show_variant,
    )
