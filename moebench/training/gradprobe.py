"""Gradient purity (the ERMoE abstract's claim that a balance loss sends the router an interfering
gradient): at probe steps only, the cosine between the router parameters' task-loss gradient and
their balance-loss gradient, for routers whose auxiliary losses include ``balance``.

``torch.autograd.grad`` reads the graph without touching ``.grad`` or any RNG, so the training step,
and a resumed run, are bit-identical with or without the probe; it costs two extra backward passes
through the router's part of the graph at those steps."""

from __future__ import annotations

import math

import torch

BALANCE_KEY = "balance"  # the aux-loss name of every balance loss (switch, softmax-topk, top-p, xmoe)


def probe_due(step: int, total: int, eval_every: int, probe_every: int | None = None) -> bool:
    """The steps that get a probe: every evaluation step (``eval_every`` and the last) and, when the
    spec has ``train.probe_every``, every such step."""
    if step == total or (eval_every > 0 and step % eval_every == 0):
        return True
    return probe_every is not None and probe_every > 0 and step % probe_every == 0


def grad_cosine(task_loss: torch.Tensor, layers) -> dict | None:
    """{"grad_cos_task_balance": cos over all routers' parameters, "grad_norm_task", "grad_norm_balance",
    "per_layer": {layer: cos}} for this step's graph, or None when no layer has a balance loss. A
    cosine is None when either gradient is zero (e.g. identical upcycled experts give the router no
    task gradient)."""
    balance = [
        (name, m.aux_losses[BALANCE_KEY])
        for name, m in layers
        if BALANCE_KEY in getattr(m, "aux_losses", {}) and m.aux_losses[BALANCE_KEY].requires_grad
    ]
    if not balance:
        return None
    params = {name: [p for p in m.router.parameters() if p.requires_grad] for name, m in layers}
    flat = [p for ps in params.values() for p in ps]
    if not flat:
        return None
    total_balance = torch.stack([b.float() for _, b in balance]).sum()
    g_task = torch.autograd.grad(task_loss, flat, retain_graph=True, allow_unused=True)
    g_bal = torch.autograd.grad(total_balance, flat, retain_graph=True, allow_unused=True)

    def vec(gs, ps):
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(gs, ps)])

    out: dict = {"per_layer": {}}
    i = 0
    for name, ps in params.items():
        n = len(ps)
        if n:
            out["per_layer"][name] = _cos(vec(g_task[i : i + n], ps), vec(g_bal[i : i + n], ps))
        i += n
    t, b = vec(g_task, flat), vec(g_bal, flat)
    out.update(grad_cos_task_balance=_cos(t, b), grad_norm_task=float(t.norm()), grad_norm_balance=float(b.norm()))
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return None
    return float(torch.dot(a, b) / (na * nb))


def mean_cos(history: list[dict]) -> float | None:
    """The mean of the logged cosines (None entries skipped); None when there are none."""
    vals = [h["grad_cos_task_balance"] for h in history if h.get("grad_cos_task_balance") is not None]
    return sum(vals) / len(vals) if vals else None
