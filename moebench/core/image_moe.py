"""The method ERMoE's released code runs: image-level routing over whole-backbone experts.

Written from the facts in ``docs/ERMOE.md`` (the released repository's licence forbids reuse; no code
is taken from it). E experts, each a copy of a ViT backbone (frozen by default) with its own linear
head on its CLS token. Per image and expert:

    X = the expert's last hidden states of the patch tokens (P x d, after the final norm)
    U = eigenvectors of X X^T (P x P, eigh)
    A = the last block's attention probabilities averaged over heads, patch-to-patch (P x P)
    score = ||diag(U^T A U)||^2 / (||U^T A U||_F^2 + 1e-10)

Selection: experts with score >= ``threshold`` (0.5), the top-k (2) of them by score; if fewer than k
qualify, add the free experts (default expert 0) in random order, then the highest remaining scores.
Output: the score-weighted average of the selected experts' head logits. No balance loss.

Every expert runs on every image (the score needs each expert's hidden states and attention), so
the active compute is E full forwards. With identical frozen copies every expert computes the same
score (``tie`` stat: the share of images whose E scores are equal), so routing cannot tell them apart;
``expert_noise`` (each expert's backbone weights perturbed by N(0, (noise * std(W))^2), its own seed)
or ``freeze_experts: false`` make them differ -- the two documented ways to see a non-degenerate case.

Routing statistics go through `ImageRoutingRecord`, a `MoELayer` whose routed unit is the image, so
metrics.jsonl and the report treat it like any token-level layer.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from moebench.core.layer import MoELayer, expert_counts
from moebench.core.routing import Router, topk_routing

TIE_TOLERANCE = 1e-6
log = logging.getLogger(__name__)


def eigen_attention_score(x: Tensor, attn: Tensor) -> Tensor:
    """Scores (B,) from patch hidden states x (B, P, d) and head-averaged attention (B, P, P)."""
    x = x.double()  # eigh of a rank-deficient Gram matrix: float64 keeps the eigenvectors stable
    _, u = torch.linalg.eigh(x @ x.mT)
    m = u.mT @ attn.double() @ u
    diag = torch.diagonal(m, dim1=-2, dim2=-1)
    return (diag.square().sum(-1) / (m.square().sum((-2, -1)) + 1e-10)).float()


def select_experts(
    scores: Tensor,
    top_k: int,
    threshold: float,
    free_experts: tuple[int, ...],
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(B, k) expert indices in priority order and the (B,) fallback flag (fewer than k qualified)."""
    B, E = scores.shape
    out = torch.empty(B, top_k, dtype=torch.long)
    fallback = torch.zeros(B, dtype=torch.bool)
    s = scores.detach().cpu()
    for b in range(B):
        order = torch.argsort(s[b], descending=True, stable=True).tolist()
        chosen = [e for e in order if s[b, e] >= threshold][:top_k]
        if len(chosen) < top_k:
            fallback[b] = True
            free = [e for e in free_experts if e not in chosen]
            perm = torch.randperm(len(free), generator=generator).tolist() if len(free) > 1 else range(len(free))
            chosen += [free[i] for i in perm][: top_k - len(chosen)]
            chosen += [e for e in order if e not in chosen][: top_k - len(chosen)]
        out[b] = torch.tensor(chosen)
    return out.to(scores.device), fallback.to(scores.device)


class ImageRoutingRecord(MoELayer):
    """Holds one forward's image-level routing as a MoE layer's ``stats`` (the metrics hook reads
    them). It computes nothing itself: ``forward(scores, idx, weights, fallback)`` records and returns None."""

    def __init__(self, router: Router, d_model: int, flops: float):
        nn.Module.__init__(self)
        self.router = router
        self.router_name = getattr(type(router), "registry_name", "ermoe-released")
        self.d_model, self.d_hidden, self.num_experts = d_model, 0, router.num_experts
        self.capacity_factor = None
        self.aux_loss: Tensor = torch.zeros(())
        self.stats: dict = {}
        self.pending_context = None
        self._flops = flops

    def flops_per_token(self) -> float:  # per image: the scores of every expert (expert forwards are outside)
        return self._flops

    def active_params(self) -> float:
        return 0.0

    def forward(self, scores: Tensor, idx: Tensor, weights: Tensor, fallback: Tensor) -> None:  # type: ignore[override]
        spread = scores.max(-1).values - scores.min(-1).values
        tie = (spread <= TIE_TOLERANCE * scores.abs().max(-1).values.clamp_min(1.0)).float()
        routing = topk_routing(
            idx,
            weights.detach(),
            self.num_experts,
            stats={
                "scores": scores.detach(),
                "top1": idx[:, 0],
                "fallback": fallback.float().mean(),
                "tie": tie.mean(),
            },
        )
        self.aux_loss = scores.new_zeros(())
        self._record_stats(routing, expert_counts(routing.expert, self.num_experts), scores.shape[0])


class _LastAttention:
    """Pre-hook on the last block's attention: recomputes its probabilities from its input (timm's
    fused attention never materialises them), averaged over heads, (B, N, N)."""

    def __init__(self):
        self.probs: Tensor | None = None

    def __call__(self, attn: Any, args):
        x = args[0]
        B, N, _ = x.shape
        h = attn.num_heads
        qkv = attn.qkv(x).reshape(B, N, 3, h, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
        self.probs = torch.softmax((q * attn.scale) @ k.mT, dim=-1).mean(1)


class ErmoeReleasedModel(nn.Module):
    """E backbone copies with their own heads, routed per image (see the module docstring)."""

    def __init__(
        self,
        backbone: Any,
        router: Router,
        threshold: float,
        free_experts: tuple[int, ...],
        freeze_experts: bool = True,
        expert_noise: float = 0.0,
    ):
        super().__init__()
        for attr in ("forward_features", "blocks", "head"):
            if not hasattr(backbone, attr):
                raise ValueError(
                    f"ermoe-released needs a ViT with forward_features, blocks and a linear head (timm ViT, "
                    f"moebench's vit3d); {type(backbone).__name__} has no {attr!r}"
                )
        if not isinstance(backbone.head, nn.Linear) or not hasattr(backbone.blocks[-1].attn, "qkv"):
            raise ValueError("ermoe-released needs a linear head and a last block with attn.qkv (timm-style attention)")
        self.router, self.threshold, self.free_experts = router, float(threshold), tuple(free_experts)
        self.top_k, self.num_experts = router.top_k, router.num_experts
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        self.experts = nn.ModuleList()
        std = {n: float(p.detach().float().std()) if p.numel() > 1 else 0.0 for n, p in backbone.named_parameters()}
        for e in range(self.num_experts):
            expert: Any = copy.deepcopy(backbone)
            expert.head.reset_parameters()  # each expert's own head (global RNG: seeded by the run)
            if expert_noise > 0:
                g = torch.Generator().manual_seed(1000 + e)
                with torch.no_grad():
                    for n, p in expert.named_parameters():
                        if not n.startswith("head."):
                            p.add_(torch.randn(p.shape, generator=g).to(p) * expert_noise * std[n])
            if freeze_experts:
                for n, p in expert.named_parameters():
                    p.requires_grad_(n.startswith("head."))
            self.experts.append(expert)
        self._hooks = [_LastAttention() for _ in range(self.num_experts)]
        for expert, hook in zip(self.experts, self._hooks):
            expert.blocks[-1].attn.register_forward_pre_hook(hook)
        d = backbone.head.in_features
        patches = getattr(getattr(backbone, "patch_embed", None), "num_patches", None)
        if patches is not None and patches > d:
            log.warning(
                "ermoe-released: %d patches > d = %d: the patch Gram matrix is rank-deficient, so its "
                "null-space eigenvectors (and the score) are arbitrary",
                patches,
                d,
            )
        self.routing = ImageRoutingRecord(router, d, float(router.flops_per_token()))
        self.num_classes = backbone.head.out_features

    def _head(self, expert: Any, feats: Tensor) -> Tensor:
        """The expert's own linear head on its CLS token (timm: ``forward_head``, which pools as the
        backbone is configured: a backbone without a class token, like the offline tiny ViT, averages)."""
        if hasattr(expert, "forward_head"):
            return expert.forward_head(feats)
        if getattr(expert, "global_pool", "token") == "avg":
            return expert.head(feats[:, self.prefix :].mean(1))
        return expert.head(feats[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        logits, scores = [], []
        expert: Any
        for expert, hook in zip(self.experts, self._hooks):
            feats = expert.forward_features(x)
            logits.append(self._head(expert, feats))
            p = self.prefix
            probs = hook.probs
            assert probs is not None, "the last block's attention did not run"
            scores.append(eigen_attention_score(feats[:, p:].detach(), probs[:, p:, p:].detach()))
            hook.probs = None
        S = torch.stack(scores, dim=1)  # (B, E): no gradient, as in the released code (heads train on logits)
        idx, fallback = select_experts(S, self.top_k, self.threshold, self.free_experts)
        all_logits = torch.stack(logits, dim=1)  # (B, E, C)
        w = S.gather(1, idx)
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-10)
        chosen = all_logits.gather(1, idx.unsqueeze(-1).expand(-1, -1, all_logits.shape[-1]))
        self.routing(S, idx, w, fallback)
        return (w.unsqueeze(-1).to(chosen.dtype) * chosen).sum(1)
