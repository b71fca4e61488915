"""EMoE: a token-level router over a shared orthonormal eigenbasis (the ERMoE authors' sister method).

Paper: arXiv 2601.12137; facts from the authors' public repository (github.com/Belis0811/EMoE), written
down in ``docs/ERMOE.md``. For a token h (d,), a shared basis Q (d x r, orthonormal columns), E experts:

    e   = (Q^T h)^2 / (sum_r (Q^T h)^2 + 1e-6)                energy over the r directions, sums to ~1
    l_e = sum_r e_r * gamma_r * softmax_over_experts(M)[e, r] + b_e
    p   = softmax(l / tau)                                      tau = 1

    gamma (r) init 1, M (E x r) standard-normal init, b (E) init 0, Q orthogonal init.

Modes: ``soft`` (every expert, weighted by p), ``top1`` / ``top2`` (the k largest p as weights, NOT
renormalised over the k, as the authors do). Q is retracted to orthonormal by a sign-fixed QR at the
start of every training forward; the only auxiliary loss is ``lambda_orth * ||Q^T Q - I||_F^2``
(``lambda_orth`` 1e-3, the layer default of their code; their training script uses 5e-4).

Left out on purpose: the authors' layer also keeps a second basis P and learnable log-eigenvalues;
neither enters the logits, so they never affect routing (nor the output) and are omitted here.

Stats: ``scores`` (the probabilities) and ``basis_overlap`` = ||Q0^T Q||_F^2 / r, the share of the
basis's span at the first forward that it still holds (1: unmoved; r / d: random).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing

from ._eigen import CapturesInitialBasis, subspace_overlap

MODES = {"soft": None, "top1": 1, "top2": 2}


@torch.no_grad()
def retract_qr(q: Tensor) -> None:
    """Replace ``q`` (d, r) in place by the Q factor of its reduced QR, signs fixed so diag(R) > 0."""
    qq, rr = torch.linalg.qr(q.float())
    sign = torch.sign(torch.diagonal(rr))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # no boolean-mask write: compiles
    q.copy_((qq * sign).to(q.dtype))


@register_router(
    "emoe", "shared-eigenbasis energy routing, soft / top-1 / top-2, orthogonality loss only (EMoE, authors' code)"
)
class EMoERouter(CapturesInitialBasis, Router):
    """EMoE's router (see the module docstring). ``rank`` r must be below d_model: with r = d the basis
    spans everything and the energies only re-express h in a rotated frame of the whole space."""

    sequence_refusal = "its score is the energy (Q^T x)^2, quadratic in the token"
    options = {
        "rank": option(128, "int", minimum=1, doc="basis rank r (< d_model)"),
        "mode": option("top1", "choice", choices=tuple(MODES), doc="soft: every expert; top1 / top2: the top experts"),
        "tau": option(1.0, "float", minimum=0.0, strict=True, finite=True, doc="softmax temperature"),
        "lambda_orth": option(1e-3, "float", minimum=0.0, finite=True, doc="orthogonality loss weight"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        rank: int = 128,
        mode: str = "top1",
        tau: float = 1.0,
        lambda_orth: float = 1e-3,
    ):
        k = MODES[mode] or num_experts
        if k > num_experts:
            raise ValueError(f"emoe option mode={mode!r} needs at least {k} experts, got num_experts={num_experts}")
        super().__init__(d_model, num_experts, k)
        if rank >= d_model:
            raise ValueError(
                f"emoe option rank={rank} must be below d_model={d_model}: a basis of rank >= d spans the whole "
                f"token space, so it selects no subspace (the energies only rotate h); choose rank < {d_model} "
                f"(EMoE uses 128 on ViT-B's d=768)"
            )
        self.mode, self.rank, self.tau, self.lambda_orth = mode, int(rank), float(tau), float(lambda_orth)
        self.Q = nn.Parameter(nn.init.orthogonal_(torch.empty(d_model, self.rank)))
        self.gamma = nn.Parameter(torch.ones(self.rank))
        self.M = nn.Parameter(torch.randn(num_experts, self.rank))
        self.b = nn.Parameter(torch.zeros(num_experts))
        # Q at the first forward (after any weight loading), saved with the model: the drift diagnostic
        self.register_buffer("initial_basis", torch.zeros(d_model, self.rank), persistent=True)
        self.register_buffer("basis_captured", torch.zeros((), dtype=torch.bool), persistent=True)
        self._overlap_cache: Tensor | None = None

    # 2: the step-0 evaluation no longer hid the tokens-per-sample count (tokens/s read as samples/s)
    version = 2

    def flops_per_token(self) -> float:
        """Projection 2*d*r, energies ~4r, logits 2*E*r (the E x r mixing matrix is per layer, not per token)."""
        return float(2 * self.d_model * self.rank + 4 * self.rank + 2 * self.num_experts * self.rank)

    def gate_parameters(self) -> list[Tensor]:
        """M, the expert-mixing matrix the logits come from (moe.router_init_std); Q stays orthogonal."""
        return [self.M]

    @torch.no_grad()
    def routing_bases(self, rank: int | None = None) -> Tensor:
        """(E, d, k): expert e's routing basis = the k columns of Q whose energy e weights most above the
        experts' mean (softmax(M)[e, r] * gamma_r minus its mean over e); k = ``rank`` (the true
        subspaces' rank, for the principal angles of the structure task), capped at r; None: r // E."""
        k = max(1, min(self.rank, int(rank) if rank else self.rank // self.num_experts))
        mix = torch.softmax(self.M.float(), dim=0) * self.gamma.float()  # (E, r)
        idx = (mix - mix.mean(0, keepdim=True)).topk(k, dim=-1).indices  # (E, k)
        return self.Q.detach().float()[:, idx].permute(1, 0, 2).contiguous()

    def probs(self, x: Tensor) -> Tensor:
        """Router probabilities (T, E), float32, differentiable in x, Q, gamma, M, b."""
        energy = (x.float() @ self.Q.float()).square()
        energy = energy / (energy.sum(-1, keepdim=True) + 1e-6)
        mix = torch.softmax(self.M.float(), dim=0) * self.gamma.float()  # (E, r): softmax over experts
        return torch.softmax((energy @ mix.T + self.b.float()) / self.tau, dim=-1)

    def orthogonality_loss(self) -> Tensor:
        q = self.Q.float()
        return (q.T @ q - torch.eye(self.rank, device=q.device)).square().sum()

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        self.capture_initial_basis(self.Q)  # first forward only (a Python flag: no host read)
        if ctx.training:
            retract_qr(self.Q)
        if not ctx.training or self._overlap_cache is None:
            self._overlap_cache = subspace_overlap(self.initial_basis, self.Q)
        p = self.probs(x)
        if self.mode == "soft":
            idx = torch.arange(self.num_experts, device=x.device).expand(x.shape[0], -1)
            order = p.detach().argsort(-1, descending=True)  # slot 0 = the token's first choice
            idx, w = idx.gather(1, order), p.gather(1, order)
        else:
            w, idx = p.topk(self.top_k, dim=-1)  # not renormalised
        aux = {"orth": self.lambda_orth * self.orthogonality_loss()} if self.lambda_orth > 0 else {}
        return topk_routing(
            idx, w, self.num_experts, aux_losses=aux, stats={"scores": p.detach(), "basis_overlap": self._overlap_cache}
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, mode={self.mode!r}, tau={self.tau}, lambda_orth={self.lambda_orth}"
