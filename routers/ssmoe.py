"""SSMoE: training-free routing on the right singular vectors of each expert's own weights.

Paper: Do, Le & Tran, "Eigenvectors of Experts are Training-free Non-collapsing Routers", arXiv
2605.30992 (ICML 2026). Rule as released (github.com/giangdip2410/SSMoE,
``Vision/CLIP-SSMoE/clipmoe/model_clipmoe.py``, ``MoEResidualAttentionBlock.get_svd`` / ``forward``).
Per expert e and each of its weight matrices A_m (nn.Linear layout, read as rows of length d):

    V_m     = right singular vectors of A_m                      (d, min(rows, d))
    j_1..k  = the k columns of V_m with the largest g_e^T v      g_e = row e of the gate (signed score)
    u_{e,m} = mean of those k columns                            (d,)
    s_e(x)  = mean_m x^T u_{e,m}                                  the SVD logits
    p       = (1 - c) softmax(x W_g^T) + c softmax(s(x))          c = 1 by default: the gate only picks the k
    S       = top-k(p);  w_i = p_i / sum_{j in S} p_j             renormalised over the k, as released

Matrices: fc1 (both halves, gate and up, for gated experts, as the language release does) and fc2,
read per ``second_layer``: ``reshape`` (the CLIP release: fc2's (d, h) weight reshaped row-major to
(h, d), not transposed) or ``transpose`` (the language release: fc2's weight transposed, so its right
singular vectors are fc2's output directions). ``k`` is 5 in both releases.

What the release computes once and caches: the SVDs and the chosen vectors, at the first forward (on
pretrained, frozen experts: the paper's training-free setting). Here too, at the first forward (after
upcycling or loading weights), kept in a buffer saved with the model, so a resumed run routes on the
same vectors. Training from scratch moves the expert weights the cache was taken from: ``refresh_every``
N > 0 recomputes it after every N optimiser steps (0: never, as released).

Gradients reach the token (softmax of the SVD logits) and, for c < 1, the gate; the cached vectors
are constants. No balance loss. Cost: 2 d E M per token for the projections (M matrices per expert),
plus 2 d E for the gate when c < 1; the SVDs (once, or every N steps) are not counted per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moebench.core.config import option
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, topk_routing

SECOND_LAYER = ("reshape", "transpose")


@register_router(
    "ssmoe",
    "SSMoE (Do et al. 2026): training-free routing on experts' right singular vectors, mixed with the gate by c",
)
class SSMoERouter(Router):
    """Routes on the mean right singular vectors of each expert's weights; see the module docstring."""

    steps: Tensor
    basis: Tensor
    basis_ready: Tensor
    options = {
        "top_k": option(2, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "c": option(
            1.0, "float", minimum=0.0, maximum=1.0, finite=True, doc="mix: 1 the SVD logits only, 0 the gate only"
        ),
        "k": option(5, "int", minimum=1, doc="singular vectors per expert matrix (<= min(d_model, d_hidden))"),
        "refresh_every": option(0, "int", minimum=0, doc="steps between basis refreshes; 0: computed once"),
        "second_layer": option("reshape", "choice", choices=SECOND_LAYER, doc="how the second expert matrix enters"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        c: float = 1.0,
        k: int = 5,
        refresh_every: int = 0,
        second_layer: str = "reshape",
    ):
        super().__init__(d_model, num_experts, top_k)
        self.c, self.k, self.refresh_every, self.second_layer = float(c), int(k), int(refresh_every), second_layer
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self._experts_ref: list[nn.Module] = []  # plain list: the layer owns the experts, not the router
        self.num_matrices = 2
        # (d, E * M): column e * M + m is u_{e,m}; sized in wrap_experts, filled at the first forward
        self.register_buffer("basis", torch.zeros(d_model, num_experts * 2), persistent=True)
        self.register_buffer("basis_ready", torch.zeros((), dtype=torch.bool), persistent=True)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=True)
        self._ready = False  # Python mirror of basis_ready: forward branches on it, never on the buffer

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.basis_ready)

    # --- experts ----------------------------------------------------------------------------------
    def wrap_experts(self, experts: nn.Module) -> nn.Module:
        """Keeps a reference to the experts (unchanged): the routing vectors come from their weights."""
        if (
            getattr(experts, "num_experts", None) != self.num_experts
            or getattr(experts, "d_model", None) != self.d_model
        ):
            raise ValueError(
                f"ssmoe routes on each expert's own weights, so it needs one expert per router output: router "
                f"(d_model={self.d_model}, num_experts={self.num_experts}) vs experts (d_model="
                f"{getattr(experts, 'd_model', None)}, num_experts={getattr(experts, 'num_experts', None)}); "
                f"null experts have no weights: set moe.null_experts to 0 with router ssmoe"
            )
        if not (callable(getattr(experts, "fc1_weight", None)) and hasattr(experts, "w2")):
            raise TypeError(
                f"ssmoe needs experts with fc1_weight() and w2 (moebench.core.experts.Experts); "
                f"got {type(experts).__name__}"
            )
        self.num_matrices = 3 if getattr(experts, "gated", False) else 2
        d_hidden: int = experts.d_hidden  # type: ignore[assignment]  # an int (nn.Module.__getattr__ says otherwise)
        ranks = [min(d_hidden, self.d_model)] + ([] if self.second_layer == "transpose" else [self.d_model])
        if self.k > min(ranks):
            raise ValueError(
                f"ssmoe option k={self.k} exceeds the {min(ranks)} singular vectors an expert matrix "
                f"has (d_model={self.d_model}, d_hidden={experts.d_hidden}); choose k <= {min(ranks)}"
            )
        self.basis = torch.zeros(self.d_model, self.num_experts * self.num_matrices, device=self.basis.device)
        self._experts_ref = [experts]
        return experts

    def expert_matrices(self) -> list[Tensor]:
        """Each expert's matrices as (E, rows, d) in nn.Linear reading: fc1 (gate and up halves when
        gated), then fc2 per ``second_layer``."""
        if not self._experts_ref:
            raise RuntimeError("ssmoe router has no experts: MoELayer calls router.wrap_experts(experts) first")
        experts = self._experts_ref[0]
        # experts: Experts-like; nn.Module.__getattr__ types their attributes as Tensor | Module
        w1 = experts.fc1_weight().detach().float().mT  # type: ignore[operator]  # (E, h or 2h, d): nn.Linear's (out, in)
        firsts = list(w1.chunk(2, dim=1)) if self.num_matrices == 3 else [w1]
        w2 = experts.w2.detach().float()  # type: ignore[operator]  # (E, h, d) = fc2's nn.Linear weight (d, h) transposed
        if self.second_layer == "reshape":
            w2 = w2.mT.contiguous().reshape(self.num_experts, -1, self.d_model)  # (d, h) read row-major as (h, d)
        return firsts + [w2]

    @torch.no_grad()
    def compute_basis(self) -> Tensor:
        """The routing vectors (d, E * M) from the experts' current weights and the gate."""
        gate = self.gate.weight.detach().float()
        cols = []
        for a in self.expert_matrices():
            v = torch.linalg.svd(a, full_matrices=False).Vh.mT  # (E, d, r): right singular vectors
            score = torch.einsum("ed,edr->er", gate, v)  # g_e^T v for every column
            idx = score.topk(self.k, dim=-1).indices  # (E, k)
            chosen = torch.gather(v, 2, idx.unsqueeze(1).expand(-1, self.d_model, -1))
            cols.append(chosen.mean(-1))  # (E, d)
        return torch.stack(cols, dim=1).reshape(-1, self.d_model).T.contiguous()  # (d, E * M), column e * M + m

    def refresh(self) -> None:
        """Recompute the cached routing vectors now."""
        with torch.no_grad():
            self.basis.copy_(self.compute_basis())
            self.basis_ready.fill_(True)
        self._ready = True

    def after_step(self) -> None:
        if self.refresh_every:
            self.steps += 1
            if int(self.steps) % self.refresh_every == 0:
                self.refresh()

    # --- cost and routing -------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        E, d, M = self.num_experts, self.d_model, self.num_matrices
        return float(2 * d * E * M + E * M + (2 * d * E if self.c < 1 else 0))

    def svd_logits(self, x: Tensor) -> Tensor:
        """s(x) (T, E): mean over the expert's matrices of the projections on the cached vectors."""
        return (x.float() @ self.basis.float()).view(x.shape[0], self.num_experts, self.num_matrices).mean(-1)

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        probs = None
        if self.c < 1:  # softmax-topk's exact ops, so c = 0 is softmax top-k bit for bit
            probs = (1 - self.c) * torch.softmax(F.linear(x, self.gate.weight.float()), dim=-1)
        if self.c > 0:
            if not self._ready:
                self.refresh()  # the release's first-forward SVD
            svd = self.c * torch.softmax(self.svd_logits(x), dim=-1)
            probs = svd if probs is None else probs + svd
        assert probs is not None
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        return topk_routing(top_i, weights, self.num_experts, stats={"scores": probs.detach()})

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, c={self.c}, k={self.k}, refresh_every={self.refresh_every}, "
            f"second_layer={self.second_layer!r}"
        )
