"""ERMoE: eigen-reparameterised experts routed by an Eigenbasis Score.

Paper: "ERMoE: Eigen-Reparameterized Mixture-of-Experts for Stable Routing and Interpretable
Specialization", arXiv 2511.10971 (CVPR 2026). This is a RECONSTRUCTION from the abstract only (no
full text, no reference code): every choice the abstract leaves open is an explicit option, with the
defaults of ``docs/ERMOE.md`` (in this repository).

Expert e (first layer in a learned orthonormal eigenbasis, second layer dense):

    fc1_e(x) = U_e diag(s_e) V_e^T x + b1_e      V_e (d x m), U_e (h x m) orthonormal columns, m = min(d, h)
    y_e(x)   = act(fc1_e(x)) W2_e + b2_e

Routing basis B_e = V_e[:, :r] (``route_rank`` r, default max(8, d // E), capped at m - 1; r >= m is
refused: B_e would be the expert's whole eigenbasis, and with m = d the subspace score is identically 1).
Upcycling gives every expert the same SVD, so each expert's columns are then permuted so that expert e
routes on its own r of the dense eigen-directions (option ``slices``; V, s and U are permuted together,
so the expert's function stays exactly the dense MLP's):

    interleaved (default)  expert e: directions e, e+E, e+2E, ... (mod m): every expert gets one
                           direction of each band of E, so no expert holds all the leading ones
    snake                  as interleaved, every other band reversed (e, 2E-1-e, 2E+e, ...)
    contiguous             expert e: e*r .. e*r + r - 1 (mod m) (issue 11's; expert 0 holds the leading
                           directions, which carry most of every token's energy: it collapses)

Slices alone still leave the expert holding direction 0 ahead (26-39 % of first choices at E = 8 on
classification, docs/ERMOE.md), so upcycled experts are also ``calibrate``d (default true, THIS SUITE'S
FIX, not in the abstract): at the first forward after upcycling, per-expert gains g (E,) are fitted on
that batch so that argmax_e g_e S_e spreads the first choices evenly, then frozen (a buffer, saved with
the model); the score is g_e S_e from then on, for selection and gate weights alike. Identical
upcycled experts with weights summing to 1 still compute exactly the dense MLP. In the trainer that
first batch is the step-0 evaluation's first batch (inputs only, no labels). Not for ``score:
context`` (a cosine that may be negative: a gain would not rescale it).

Score S (T, E):

    subspace  S_e = ||B_e^T x|| / ||x||                            cosine of x with span(B_e), in [0, 1]
    context   S_e = cos(B_e^T x, B_e^T c)                          c = the token's attention output
    weighted  S_e = ||diag(|s_e[:r]|) B_e^T x|| / (max|s_e[:r]| ||x||)   in [0, 1]

The ``context`` score and the threshold / free-expert selection are THIS SUITE'S EXTENSIONS, not in the
abstract (grid labels carry ``-ext``); the abstract's method is the ``subspace`` score with plain top-k.

Selection: experts with S >= ``threshold`` are candidates, keep the top-k of them; if fewer than k
qualify, fill first with ``free_experts`` (highest score first), then with the highest remaining
scores, so every token gets exactly k distinct experts. Gate weights over the k selected:
``normalized`` S / sum S (sum clamped at 1e-8; the context cosine is first mapped to (1 + S) / 2 so
weights stay non-negative) or ``softmax`` softmax(S / temperature). There is no balancing loss; the
only auxiliary loss is ``orth`` with ``ortho="penalty"``.

Stats: ``scores`` (T, E), ``top1`` (the first choice, which a free expert can take), ``fallback``
(share of tokens with fewer than k candidates) and ``ortho_error`` = max_e ||V_e^T V_e - I||_F,
measured in every evaluation forward (training forwards reuse the last value, except ``penalty``
which gets it free from its loss), and ``basis_overlap`` = mean_e ||B0_e^T B_e||_F^2 / r, the share of
each routing basis's initial span it still holds (1: the basis has not moved; r / d: a random one). B0
is taken at the first forward (after upcycling or loading weights) and saved with the model. An
evaluation runs at step 0, so the load before any learning is logged.

Controls: ``freeze_basis`` routes on B0 for the whole run (a fixed projection: random at fresh init, the
dense eigen-directions when upcycled) while the experts still learn; ``eigen_lr_scale`` trains V, U and
s at that multiple of the run's learning rate.

Cost: the score is 2*E*d*r FLOPs per token (counted in ``flops_per_token``). On CPU the backward
only runs over the k chosen pairs. The eigen experts apply fc1 factored (an extra d*m multiply-add
per token and active expert) or rebuild W1 once per forward, whichever is cheaper (``fc1_mode``);
the layer's FLOP count, like the paper's, counts the function: a dense d x h first layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from moebench.core.config import option
from moebench.core.experts import Experts, activation_fn, grouped_matmul
from moebench.core.registry import register_router
from moebench.core.routing import Router, Routing, RoutingContext, expert_counts, topk_routing

from ._eigen import CapturesInitialBasis, scale_lr, subspace_overlap

ORTHO_CHOICES = ("qr", "cayley", "matrix_exp", "penalty")
SCORE_CHOICES = ("subspace", "context", "weighted")
SLICE_CHOICES = ("interleaved", "snake", "contiguous")
WEIGHT_CHOICES = ("normalized", "softmax")
FC1_MODES = ("auto", "factored", "dense")
_EPS = 1e-8


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"ermoe option {name}={value!r} is not valid; choose one of {', '.join(map(repr, allowed))}")
    return value


class EigenExperts(Experts):
    """E experts whose first layer is stored as an SVD: V (E, d, m), s (E, m), U (E, h, m).

    Same interface as ``Experts`` (``fc1_weight()`` is V diag(s) U^T, shape (E, d, h)), so the MoE
    layer runs it unchanged. Built from dense weights by SVD, so a freshly wrapped expert computes
    the dense expert's function. ``fc1_mode`` picks how fc1 is applied: ``factored`` (x V diag(s),
    then U^T: N*m*(d+h) multiply-adds for N rows), ``dense`` (rebuild W1 = V diag(s) U^T once per
    forward: E*d*m*h, then N*d*h) or ``auto`` (whichever of the two costs fewer multiply-adds)."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "gelu",
        fc1_mode: str = "auto",
        init: bool = True,
    ):
        nn.Module.__init__(self)  # Experts.__init__ would create a dense w1 this module replaces
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.rank = min(d_model, d_hidden)
        self.activation = activation
        self.act = activation_fn(activation)
        self.fc1_mode = _choice("fc1_mode", fc1_mode, FC1_MODES)
        m = self.rank
        self.V = nn.Parameter(torch.empty(num_experts, d_model, m))
        self.s = nn.Parameter(torch.empty(num_experts, m))
        self.U = nn.Parameter(torch.empty(num_experts, d_hidden, m))
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))
        self.use_grouped_mm = True
        self.routing_stride = 0  # set by the router: load_dense gives each expert its own leading columns
        self.routing_slices = "interleaved"  # ... in this layout (SLICE_CHOICES)
        self.upcycled = False  # set by load_dense / load_experts: the router may calibrate its selection
        if init:
            self.reset_parameters()

    @classmethod
    def from_experts(cls, experts: Experts, fc1_mode: str = "auto") -> EigenExperts:
        """Reparameterise existing dense experts (same function, to float tolerance)."""
        for attr in ("num_experts", "d_model", "d_hidden", "b1", "w2", "b2"):
            if not hasattr(experts, attr):
                raise TypeError(
                    f"ermoe can only wrap moebench.core.experts.Experts-like modules; {type(experts).__name__} lacks {attr!r}"
                )
        if getattr(experts, "gated", False):
            raise ValueError(
                f"ermoe reparameterises a single fc1, not gated {experts.activation!r} experts; "
                f"use a non-gated moe.activation (or null) with router ermoe"
            )
        eig = cls(
            experts.num_experts,
            experts.d_model,
            experts.d_hidden,
            getattr(experts, "activation", "gelu"),
            fc1_mode=fc1_mode,
            init=False,
        )
        eig._set_dense(experts.fc1_weight().detach(), experts.b1.detach(), experts.w2.detach(), experts.b2.detach())
        return eig

    # --- parameters -------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init of a dense expert, then its SVD (so the init matches Experts')."""
        E, d, h = self.num_experts, self.d_model, self.d_hidden
        b_in, b_hid = 1.0 / math.sqrt(d), 1.0 / math.sqrt(h)
        w1 = torch.empty(E, d, h).uniform_(-b_in, b_in)
        b1 = torch.empty(E, h).uniform_(-b_in, b_in)
        w2 = torch.empty(E, h, d).uniform_(-b_hid, b_hid)
        b2 = torch.empty(E, d).uniform_(-b_hid, b_hid)
        self._set_dense(w1, b1, w2, b2)

    @torch.no_grad()
    def _set_dense(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
        """Load dense (E, d, h) / (E, h) / (E, h, d) / (E, d) weights, factoring w1 by a reduced SVD."""
        svd_u, svd_s, svd_vh = torch.linalg.svd(w1.to(torch.float32), full_matrices=False)
        self._assign("V", svd_u)
        self._assign("U", svd_vh.mT)
        self.s.copy_(svd_s)
        self.b1.copy_(b1)
        self.w2.copy_(w2)
        self.b2.copy_(b2)

    def _assign(self, name: str, value: Tensor) -> None:
        # A parametrised basis must be set through its right-inverse, a plain one copied in place (keeps
        # the Parameter object, so optimiser state stays attached).
        if parametrize.is_parametrized(self, name):
            setattr(self, name, value.to(getattr(self, name).dtype).contiguous())
        else:
            getattr(self, name).copy_(value)

    def parametrize_orthogonal(self, orthogonal_map: str) -> None:
        """Keep V and U exactly orthonormal through torch's orthogonal parametrisation."""
        for name in ("V", "U"):
            orthogonal(self, name, orthogonal_map=orthogonal_map)

    @torch.no_grad()
    def reorthonormalize(self) -> None:
        """Replace V and U by the Q of their reduced QR, signs fixed so diag(R) > 0 (Q stays close to
        the drifted basis instead of flipping columns)."""
        for name in ("V", "U"):
            if parametrize.is_parametrized(self, name):
                continue  # already orthonormal by construction
            p = getattr(self, name)
            q, r = torch.linalg.qr(p.float())
            sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
            sign[sign == 0] = 1.0
            p.copy_(q * sign.unsqueeze(-2))

    def orthogonality_error(self, basis: str = "V") -> Tensor:
        """max over experts of the Frobenius norm ||B^T B - I||_F, B = V or U (0-d, detached)."""
        b = getattr(self, _choice("basis", basis, ("V", "U"))).detach().float()
        gram = b.mT @ b
        eye = torch.eye(gram.shape[-1], device=gram.device)
        return torch.linalg.matrix_norm(gram - eye).max()

    def fc1_weight(self) -> Tensor:
        return (self.V * self.s.unsqueeze(1)) @ self.U.mT

    @torch.no_grad()
    def load_dense(
        self, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None
    ) -> None:
        """Upcycle: every expert becomes the dense MLP (nn.Linear layout (out, in)), via its SVD."""
        self.check_dense_shapes(fc1_weight, fc2_weight)
        E = self.num_experts
        b1 = fc1_bias if fc1_bias is not None else fc1_weight.new_zeros(self.d_hidden)
        b2 = fc2_bias if fc2_bias is not None else fc2_weight.new_zeros(self.d_model)
        self.load_experts(
            fc1_weight.t().unsqueeze(0).expand(E, -1, -1),
            b1.expand(E, -1),
            fc2_weight.t().unsqueeze(0).expand(E, -1, -1),
            b2.expand(E, -1),
        )

    @torch.no_grad()
    def load_experts(self, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> None:
        """Upcycle from per-expert dense weights (E, d, h) / (E, h) / (E, h, d) / (E, d) (Drop-Upcycling
        gives each expert its own), via each one's SVD, then give each expert its routing slice."""
        self._set_dense(w1, b1, w2, b2)
        self.upcycled = True
        if self.routing_stride:
            self.assign_slices(self.routing_stride, self.routing_slices)

    @torch.no_grad()
    def assign_slices(self, r: int, kind: str = "interleaved") -> None:
        """Permute expert e's SVD columns (V, s and U together: the function is unchanged) so that its
        first r columns are its own eigen-directions (`slice_indices`), the rest after them in order."""
        perm = slice_permutation(kind, self.num_experts, self.rank, r)
        for name in ("V", "U"):
            value = getattr(self, name).detach()
            self._assign(name, torch.gather(value, 2, perm.unsqueeze(1).expand_as(value).to(value.device)))
        self.s.copy_(torch.gather(self.s, 1, perm.to(self.s.device)))

    def stagger_columns(self, stride: int) -> None:
        """Issue 11's contiguous slices (expert e: e*stride ..): kept for the design comparison."""
        self.assign_slices(stride, "contiguous")

    # --- forward ----------------------------------------------------------------------------------
    def uses_factored(self, num_rows: int) -> bool:
        if self.fc1_mode != "auto":
            return self.fc1_mode == "factored"
        d, h, m = self.d_model, self.d_hidden, self.rank
        return num_rows * m * (d + h) <= self.num_experts * d * m * h + num_rows * d * h

    def fc1(self, x_sorted: Tensor, counts: Tensor, contiguous_grad: bool = True) -> Tensor:
        dtype, gmm = x_sorted.dtype, self.use_grouped_mm
        if not self.uses_factored(x_sorted.shape[0]):
            return grouped_matmul(x_sorted, self.fc1_weight().to(dtype), counts, gmm, contiguous_grad)
        vs = (self.V * self.s.unsqueeze(1)).to(dtype)  # (E, d, m): s folded into V, no per-row scale
        # U^T as a column-major view: no (E, m, h) copy per forward
        return grouped_matmul(
            grouped_matmul(x_sorted, vs, counts, gmm), self.U.to(dtype).mT, counts, gmm, contiguous_grad
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"rank={self.rank}, fc1_mode={self.fc1_mode!r}"
        )


@torch.no_grad()
def balance_offsets(S: Tensor, iters: int = 300) -> Tensor:
    """Offsets c (E,) such that argmax_e (S - c) gives each expert about 1/E of the first choices of
    the tokens S (T, E): c_e rises while expert e is over its share (a decaying step, so it settles);
    returned centred (mean 0)."""
    T, E = S.shape
    c = S.new_zeros(E, dtype=torch.float32)
    spread = float((S.float().amax(-1) - S.float().amin(-1)).mean().clamp_min(1e-6))
    for i in range(iters):
        counts = torch.bincount((S.float() - c).argmax(-1), minlength=E).float() / T
        c += spread * 0.5 * 0.985**i * (counts - 1.0 / E)
    return c - c.mean()


def slice_indices(kind: str, num_experts: int, m: int, r: int) -> list[list[int]]:
    """The r eigen-directions (indices into the m singular directions, largest first) expert e routes
    on, per expert: ``interleaved`` e + j*E, ``snake`` the same with odd bands reversed, ``contiguous``
    e*r + j (all mod m)."""
    _choice("slices", kind, SLICE_CHOICES)
    E = num_experts
    if kind == "contiguous":
        return [[(e * r + j) % m for j in range(r)] for e in range(E)]
    if kind == "snake":
        return [[(j * E + (e if j % 2 == 0 else E - 1 - e)) % m for j in range(r)] for e in range(E)]
    return [[(j * E + e) % m for j in range(r)] for e in range(E)]


def slice_permutation(kind: str, num_experts: int, m: int, r: int) -> Tensor:
    """(E, m) column order per expert: its `slice_indices` first (a repeat, possible when E*r > m, is
    kept once), then every other column in its original order."""
    rows = []
    for lead in slice_indices(kind, num_experts, m, r):
        first = list(dict.fromkeys(lead))
        rows.append(first + [i for i in range(m) if i not in set(first)])
    return torch.tensor(rows, dtype=torch.long)


@register_router(
    "ermoe",
    "eigenbasis-score routing over orthonormally reparameterised experts, no balance loss (ERMoE "
    "reconstruction from the abstract; score=context and threshold/free_experts are this suite's extensions)",
)
class ErMoERouter(CapturesInitialBasis, Router):
    """ERMoE (arXiv 2511.10971, CVPR 2026), reconstructed from the abstract; see the module docstring.

    Owns the experts' parameterisation through ``wrap_experts`` (returns an ``EigenExperts``) and keeps
    a reference to it outside the module tree, so its parameters appear once in the state dict (under
    the layer's ``experts``) and nowhere under the router, which has no parameters of its own."""

    free_mask: Tensor
    score_gain: Tensor

    sequence_refusal = "its score is the cosine of each token with an expert's eigen-subspace, not linear in the token"
    options = {
        "top_k": option(2, "int", minimum=1, doc="experts per token (<= num_experts)"),
        "ortho": option("qr", "choice", choices=ORTHO_CHOICES, doc="how V and U stay orthonormal"),
        "lambda_orth": option(
            5e-4, "float", minimum=0.0, finite=True, doc="orthogonality penalty weight (ortho: penalty)"
        ),
        "route_rank": option(
            None,
            "int",
            minimum=1,
            nullable=True,
            doc="routing basis rank (< d_model); null: max(8, d_model // num_experts)",
        ),
        "score": option("subspace", "choice", choices=SCORE_CHOICES, doc="what is scored against the eigenbases"),
        "threshold": option(
            0.0, "float", minimum=-1.0, maximum=1.0, doc="cosine below which a pair is dropped (0: plain top-k)"
        ),
        "free_experts": option(None, "indices", nullable=True, doc="expert indices every token also visits"),
        "weights": option("normalized", "choice", choices=WEIGHT_CHOICES, doc="combine weights from the scores"),
        "temperature": option(
            0.7, "float", minimum=0.0, strict=True, finite=True, doc="softmax temperature (weights: softmax)"
        ),
        "fc1_mode": option(
            "auto", "choice", choices=FC1_MODES, doc="apply fc1 factored, dense, or whichever is cheaper"
        ),
        "freeze_basis": option(False, "bool", doc="route on the initial basis B0 (a control)"),
        "eigen_lr_scale": option(1.0, "float", minimum=0.0, strict=True, finite=True, doc="x the run's lr for V, U, s"),
        "slices": option(
            "interleaved", "choice", choices=SLICE_CHOICES, doc="which eigen-directions each upcycled expert routes on"
        ),
        "calibrate": option(True, "bool", doc="per-expert score gains fitted at the first forward after upcycling"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        ortho: str = "qr",
        lambda_orth: float = 5e-4,
        route_rank: int | None = None,
        score: str = "subspace",
        threshold: float = 0.0,
        free_experts: list[int] | None = None,
        weights: str = "normalized",
        temperature: float = 0.7,
        fc1_mode: str = "auto",
        freeze_basis: bool = False,
        eigen_lr_scale: float = 1.0,
        slices: str = "interleaved",
        calibrate: bool = True,
    ):
        super().__init__(d_model, num_experts, top_k)
        self.ortho, self.score, self.weights, self.fc1_mode = ortho, score, weights, fc1_mode
        self.slices, self.calibrate = slices, calibrate
        if route_rank is not None and route_rank >= d_model:
            raise ValueError(
                f"ermoe option route_rank must be an integer in [1, d_model={d_model}) or None "
                f"(default max(8, d_model // num_experts)), got {route_rank!r}: at r = d_model the routing "
                f"basis spans every token, so the subspace score is identically 1"
            )
        self.freeze_basis, self.eigen_lr_scale = freeze_basis, float(eigen_lr_scale)
        self.lambda_orth = float(lambda_orth)
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.route_rank_option = route_rank
        self.route_rank = (
            int(route_rank) if route_rank is not None else min(d_model - 1, max(8, d_model // num_experts))
        )
        self.free_experts = self._check_free(free_experts, num_experts)
        free_mask = torch.zeros(num_experts, dtype=torch.bool)
        free_mask[list(self.free_experts)] = True
        self.register_buffer("free_mask", free_mask, persistent=False)
        self.needs_context = self.score == "context"
        self._experts_ref: list[EigenExperts] = []  # plain list: not a submodule, no duplicate state
        self._ortho_cache: Tensor | None = None
        self._overlap_cache: Tensor | None = None
        # B0: the routing bases at the first forward (drift diagnostic; the frozen-basis control routes on it)
        # (sized in wrap_experts; saved with the model so a resumed run measures drift from the same B0)
        self.register_buffer("initial_basis", torch.zeros(0), persistent=True)
        self.register_buffer("basis_captured", torch.zeros((), dtype=torch.bool), persistent=True)
        # per-expert score gains of upcycled experts (``calibrate``): fitted at the first forward, then fixed
        self.register_buffer("score_gain", torch.ones(num_experts), persistent=True)

    # 2: the step-0 evaluation no longer hid the tokens-per-sample count (tokens/s read as samples/s)
    # 3: upcycled experts route on interleaved eigen-directions (slices), not contiguous ones (issue 18)
    version = 3

    @staticmethod
    def _check_free(free_experts, num_experts: int) -> tuple[int, ...]:
        if free_experts is None:
            return ()
        for i in free_experts:
            if i >= num_experts:
                raise ValueError(
                    f"ermoe option free_experts has {i!r}: every entry must be an expert index in [0, {num_experts - 1}]"
                )
        return tuple(int(i) for i in free_experts)

    # --- expert ownership -------------------------------------------------------------------------
    def wrap_experts(self, experts: nn.Module) -> EigenExperts:
        if (
            getattr(experts, "num_experts", None) != self.num_experts
            or getattr(experts, "d_model", None) != self.d_model
        ):
            raise ValueError(
                f"ermoe router (d_model={self.d_model}, num_experts={self.num_experts}) cannot wrap experts with "
                f"d_model={getattr(experts, 'd_model', None)}, num_experts={getattr(experts, 'num_experts', None)}"
            )
        eig = EigenExperts.from_experts(experts, fc1_mode=self.fc1_mode)  # type: ignore[arg-type]  # it checks the attributes
        if self.route_rank >= eig.rank:
            if self.route_rank_option is not None or eig.rank < 2:
                raise ValueError(
                    f"ermoe option route_rank={self.route_rank} exceeds the eigenbasis size m=min(d_model, "
                    f"d_hidden)={eig.rank} or equals it (the routing basis would be the expert's whole "
                    f"eigenbasis, the same span for every expert when m = d_model); choose route_rank < {eig.rank}"
                )
            self.route_rank = eig.rank - 1
        self.initial_basis = torch.zeros(self.num_experts, self.d_model, self.route_rank, device=eig.V.device)
        eig.routing_stride = self.route_rank  # upcycling: expert e routes on its own slice of the dense SVD
        eig.routing_slices = self.slices
        scale_lr((eig.V, eig.U, eig.s), self.eigen_lr_scale)
        if self.ortho in ("cayley", "matrix_exp"):
            eig.parametrize_orthogonal(self.ortho)
        self._experts_ref = [eig]
        return eig

    @property
    def eigen_experts(self) -> EigenExperts:
        if not self._experts_ref:
            raise RuntimeError(
                "ermoe router has no experts: call router.wrap_experts(experts) first (MoELayer does this) "
                "and use the returned module as the layer's experts"
            )
        return self._experts_ref[0]

    def orthogonality_error(self, basis: str = "V") -> Tensor:
        """max_e ||B_e^T B_e - I||_F for B = V (default) or U."""
        return self.eigen_experts.orthogonality_error(basis)

    # --- cost -------------------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        """2*E*d*r for the projections (twice with the context score), plus norms and the ||x|| term."""
        E, d, r = self.num_experts, self.d_model, self.route_rank
        passes = 2 if self.score == "context" else 1
        return float(passes * (2 * E * d * r + 2 * E * r) + 2 * d + 4 * E)

    # --- routing ----------------------------------------------------------------------------------
    @torch.no_grad()
    def routing_bases(self, rank: int | None = None) -> Tensor:
        """(E, d, route_rank): each expert's routing basis B_e in the layer's input space (the principal
        angles of the structure task; ``rank`` is ignored, the basis is what the router routes on)."""
        return self._basis().detach().float()

    def _basis(self, V: Tensor | None = None) -> Tensor:
        if self.freeze_basis and self._captured_flag:
            return self.initial_basis  # the fixed-projection control
        V = self.eigen_experts.V if V is None else V
        return V[..., : self.route_rank].float()  # (E, d, r): B_e = the first r eigen-directions

    def _check_context(self, context: Tensor | None) -> None:
        if self.score == "context" and context is None:
            raise ValueError(
                "ermoe with score='context' needs the attention context (ctx.context): call the MoE layer "
                "as layer(x, context=attn_out), or build the model with moebench.core.moefy"
            )

    def _score_from(self, px: Tensor, pc: Tensor | None, x_norm: Tensor, scale: Tensor) -> Tensor:
        """Score from projections px = B^T x (..., r); shared by the all-experts and the per-pair paths."""
        if self.score == "context":
            assert pc is not None  # _check_context: a context with score context
            return F.cosine_similarity(px, pc, dim=-1, eps=_EPS)
        if self.score == "subspace":
            return torch.linalg.vector_norm(px, dim=-1) / x_norm
        # weighted: |s| on the routing columns, divided by its max so the score stays in [0, 1]
        return torch.linalg.vector_norm(px * scale, dim=-1) / (x_norm * scale.amax(-1).clamp_min(_EPS))

    def scores(self, x: Tensor, context: Tensor | None = None, V: Tensor | None = None) -> Tensor:
        """Eigenbasis scores of every expert (T, E), float32, differentiable in x, V (and s: weighted)."""
        self._check_context(context)
        T, d = x.shape
        E, r = self.num_experts, self.route_rank
        basis = self._basis(V).permute(1, 0, 2).reshape(d, E * r)  # all experts' B_e side by side
        px = (x.float() @ basis).view(T, E, r)
        pc = None if context is None or self.score != "context" else (context.float() @ basis).view(T, E, r)
        x_norm = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True).clamp_min(_EPS)
        scale = self.eigen_experts.s[:, :r].float().abs()
        return self._score_from(px, pc, x_norm, scale)

    def _pair_scores(self, x: Tensor, context: Tensor | None, V: Tensor, idx: Tensor) -> Tensor:
        """Scores (T, k) of the chosen pairs only, recomputed with autograd. The gate weights' gradient
        is nonzero only there, so the backward costs T*k*d*r instead of T*E*d*r multiply-adds."""
        T, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        counts = expert_counts(flat, self.num_experts)
        basis = self._basis(V).contiguous()
        px = grouped_matmul(x.float()[tok], basis, counts)  # (T*k, r), pairs grouped by expert
        pc = None if self.score != "context" else grouped_matmul(context.float()[tok], basis, counts)  # type: ignore[union-attr]  # _check_context
        x_norm = torch.linalg.vector_norm(x.float(), dim=-1).clamp_min(_EPS)[tok]
        scale = self.eigen_experts.s[:, : self.route_rank].float().abs()[flat[order]]
        s_sorted = self._score_from(px, pc, x_norm, scale)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return s_sorted[inverse].view(T, k)

    def select(self, S: Tensor) -> tuple[Tensor, Tensor]:
        """Indices (T, k) in priority order (candidates by score, then free experts by score, then the
        rest by score) and the per-token fallback flag (T,)."""
        with torch.no_grad():
            S = S.detach()
            cand = S >= self.threshold
            # S lies in [-1, 1]: offsets 6 / 3 / 0 put the three groups in disjoint bands of one key.
            key = S + 6.0 * cand
            if self.free_experts:
                key = key + 3.0 * (self.free_mask.to(S.device) & ~cand)
            top, idx = key.topk(self.top_k, dim=-1)
            fallback = top[:, -1] < 5.0  # the k-th choice is no candidate: fewer than k qualified
        return idx, fallback

    def forward(self, x: Tensor, ctx: RoutingContext) -> Routing:
        eig = self.eigen_experts
        context = ctx.context if self.score == "context" else None
        self._check_context(context)
        V = eig.V  # one access: a parametrised basis is computed once per forward here
        first = not self._captured_flag
        self.capture_initial_basis(V[..., : self.route_rank])  # first forward only (a Python flag: no host read)
        if first and self.calibrate and eig.upcycled and self.score != "context":
            with torch.no_grad():  # gains g = exp(-c), c fitted on log S: argmax_e g_e S_e spreads evenly
                self.score_gain.copy_(torch.exp(-balance_offsets(self.scores(x, context, V).clamp_min(_EPS).log())))
        gain = self.score_gain
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, V, eig.s, context))
        # On CPU the projection's FLOPs dominate, so the backward runs over the chosen pairs only; on a
        # GPU the dense (T, d) x (d, E*r) product is cheap and the pair path's sort would cost more.
        if needs_grad and self.top_k < self.num_experts and x.device.type == "cpu":
            with torch.no_grad():
                S = self.scores(x, context, V)
                S = S * gain
            idx, fallback = self.select(S)
            s_sel = self._pair_scores(x, context, V, idx) * gain[idx]
        else:
            S = self.scores(x, context, V) * gain
            idx, fallback = self.select(S)
            s_sel = S.gather(1, idx)
        if self.weights == "softmax":
            w = torch.softmax(s_sel / self.temperature, dim=-1)
        else:
            if self.score == "context":
                s_sel = (1.0 + s_sel) / 2.0  # cosine in [-1, 1] -> [0, 1] so weights stay non-negative
            w = s_sel / s_sel.sum(-1, keepdim=True).clamp_min(_EPS)
        aux: dict[str, Tensor] = {}
        if self.ortho == "penalty":
            eye = torch.eye(V.shape[-1], device=V.device)
            err_v = (V.float().mT @ V.float() - eye).square().sum((-2, -1))  # (E,) squared Frobenius
            U = eig.U.float()
            err_u = (U.mT @ U - eye).square().sum((-2, -1))
            aux["orth"] = self.lambda_orth * (err_v.sum() + err_u.sum())
            self._ortho_cache = err_v.detach().max().sqrt()
        elif not ctx.training or self._ortho_cache is None:
            self._ortho_cache = self._ortho_error_stat(V)
        if not ctx.training or self._overlap_cache is None:
            self._overlap_cache = subspace_overlap(self.initial_basis, V[..., : self.route_rank])
        stats = {
            "scores": S.detach(),
            "top1": idx[:, 0].detach(),
            "fallback": fallback.float().mean(),
            "ortho_error": self._ortho_cache,
            "basis_overlap": self._overlap_cache,
        }
        return topk_routing(idx, w, self.num_experts, aux_losses=aux, stats=stats)

    @torch.no_grad()
    def _ortho_error_stat(self, V: Tensor) -> Tensor:
        # Measured in every evaluation forward; a training forward reuses the last value, since the
        # E*d*m^2 Gram product would add ~1.5% to a training step (penalty mode gets it for free).
        b = V.detach().float()
        gram = b.mT @ b
        return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[-1], device=gram.device)).max()

    def after_step(self) -> None:
        if self.ortho == "qr" and self._experts_ref:
            self._experts_ref[0].reorthonormalize()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, score={self.score!r}, ortho={self.ortho!r}, route_rank={self.route_rank}, "
            f"threshold={self.threshold}, free_experts={list(self.free_experts)}, weights={self.weights!r}, "
            f"freeze_basis={self.freeze_basis}, eigen_lr_scale={self.eigen_lr_scale}"
        )
