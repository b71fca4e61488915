"""An independent transcription of SSMoE's released CLIP-MoE block (github.com/giangdip2410/SSMoE,
``Vision/CLIP-SSMoE/clipmoe/model_clipmoe.py``: ``get_svd`` and ``forward``), on per-expert
``nn.Sequential(c_fc, act, c_proj)`` experts in nn.Linear layout, looping over experts as the release
does. It shares no code with ``routers/ssmoe.py``: torch.svd instead of linalg.svd, a Python loop over
experts, the release's concatenation order. ``transpose_fc2`` follows the language release, which reads
the second layer as ``down_proj.weight.T``."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def release_svd(gate_weight, experts, k: int = 5, transpose_fc2: bool = False):
    """The cached (d, E * 2) routing matrix of ``get_svd``."""
    d = gate_weight.shape[1]
    all_vector = None
    for idx, ex in enumerate(experts):
        _, _, v1 = torch.svd(ex.c_fc.weight.float().reshape(-1, d))
        top1 = torch.topk((gate_weight[idx, :].reshape(1, -1) @ v1).reshape(-1), k=k, dim=0).indices
        v1 = v1[:, top1]
        fc2 = ex.c_proj.weight.T if transpose_fc2 else ex.c_proj.weight
        _, _, v2 = torch.svd(fc2.float().reshape(-1, d))
        top2 = torch.topk((gate_weight[idx, :].reshape(1, -1) @ v2).reshape(-1), k=k, dim=0).indices
        v2 = v2[:, top2]
        s_all = torch.concat([v1.mean(dim=-1).unsqueeze(-1), v2.mean(dim=-1).unsqueeze(-1)], dim=-1)
        all_vector = s_all.unsqueeze(1) if all_vector is None else torch.concat([all_vector, s_all.unsqueeze(1)], dim=1)
    return all_vector.reshape(d, -1)


def release_moe(x, gate_weight, experts, top_k: int = 2, c: float = 1.0, k: int = 5, transpose_fc2: bool = False):
    """The MoE part of ``MoEResidualAttentionBlock.forward`` on ``x`` (B, N, d): (output, selected, weights)."""
    num_experts = len(experts)
    b, n, d = x.shape
    svd = release_svd(gate_weight, experts, k, transpose_fc2)
    hidden = x.reshape(-1, d)
    router_logits = hidden @ gate_weight.T
    quantized = (hidden @ svd).reshape(b * n, num_experts, -1).mean(dim=-1)
    rev2 = F.softmax(quantized, dim=1, dtype=torch.float)
    weights = F.softmax(router_logits, dim=1, dtype=torch.float) * (1 - c) + rev2 * c
    weights, selected = torch.topk(weights, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros(b * n, d)
    mask = F.one_hot(selected, num_classes=num_experts).permute(2, 1, 0)
    for e in range(num_experts):
        slot, tok = torch.where(mask[e])
        out.index_add_(0, tok, experts[e](hidden[tok]) * weights[tok, slot, None])
    return out.reshape(b, n, d), selected, weights


def release_experts(layer) -> nn.ModuleList:
    """moebench Experts (E, d, h) / (E, h, d) copied into per-expert c_fc / GELU / c_proj modules."""
    ex = layer.experts
    mods = nn.ModuleList()
    for e in range(ex.num_experts):
        c_fc, c_proj = nn.Linear(ex.d_model, ex.d_hidden), nn.Linear(ex.d_hidden, ex.d_model)
        with torch.no_grad():
            c_fc.weight.copy_(ex.w1[e].T)
            c_fc.bias.copy_(ex.b1[e])
            c_proj.weight.copy_(ex.w2[e].T)
            c_proj.bias.copy_(ex.b2[e])
        mods.append(nn.Sequential(OrderedDict(c_fc=c_fc, gelu=nn.GELU(), c_proj=c_proj)))
    return mods
