"""Ground-truth routing task: sequences whose right partition into experts is known, so one can ask
whether a router *finds* it (the recovery metrics in ``moebench.training.recovery``), not only whether
the model is accurate.

Every example belongs to one group g (K groups); each token carries the example's group as its
label, or -1 ("irrelevant") for noise tokens, and a role (feature, centre, distractor, noise) for the
per-role metrics. ``task_args.data`` picks the generator (all constants below are the defaults):

- ``clusters`` (Chen et al. 2022, "Towards Understanding the Mixture-of-Experts Layer in Deep Learning",
  NeurIPS, arXiv 2208.02813; code github.com/uclaml/MoE): K = 4, four patches of dimension d = 50,
  orthonormal features v_k and centres c_k (Gram-Schmidt = QR of a Gaussian), patches
  [y·α·v_k, β·c_k, ε·γ·v_k', ξ] in random order, α~U(0.5,2), β~U(1,2), γ~U(0.5,3), ε = ±1, k' ≠ k,
  ξ ~ N(0, σ² I) with σ = 1/√50 (``setting`` 1) or 2/√50 (setting 2), input ×10; label y = ±1.
  Only the centre says which v is the feature, so a token-wise model cannot tell feature from
  distractor (Chen: one CNN 79.6 %, MoE 100 %); the distractor's label is the example's group k.
- ``subspaces``: K = 4 subspaces of R^32 of rank r = 4, U_c = cos θ S + sin θ P_c (S shared, P_c private,
  all orthonormal), so every principal angle between two subspaces is arccos(cos² θ) = ``angle``
  (60°); feature tokens x = U_c z + σ e (σ = 0.1), z ~ N(0, I_r); label 1[Σ_t w_cᵀ z_t > 0] with a
  cluster-specific unit w_c. An eigenbasis router should win here by construction.
- ``mean-shift``: the adversarial twin: 4 groups = (μ_0, +), (μ_0, -), (μ_1, +), (μ_1, -), feature tokens
  x ~ N(±ρ μ_c, I) (ρ = 3, μ orthonormal), label 1[Σ_t w_gᵀ x_t > 0] with w_g ⟂ every μ. An energy score
  (Qᵀx)² cannot tell μ from -μ; a linear gate can.
- ``latent-regression`` (Kawata et al., ICML 2025, arXiv 2506.01656): feature tokens x ~ N(ρ v_c, I_16)
  (ρ = 3), per-token target f_c(w_cᵀx) + s_c g(w_gᵀx) with f_c = He_3 / √6, g = He_2 / √2,
  s = (1, -1, 1, -1) (Σ s_c = 0); the example's target is the mean over feature tokens plus ν ~ N(0, 0.1²).

Every generator but ``clusters`` adds ``noise_tokens`` (2 of 8) irrelevant tokens N(0, I). Headline
``score``: accuracy (classification generators) or R² (latent-regression), both higher is better.

Model: a token-wise MLP (``depth`` pre-norm residual blocks x + MLP(LN(x)), no attention: the
``attn`` module is an identity that only exposes the normed tokens to context-reading routers), mean
pooling, a linear head. With no token mixing, a dense model cannot combine the centre with the
feature on ``clusters``; an MoE routing each *sequence* on its summed tokens can (Chen's router)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from moebench.core.registry import register_task
from moebench.core.task import Preset, Task

from .common import apply_moe

GENERATORS = ("clusters", "subspaces", "mean-shift", "latent-regression")
ROLES = ("feature", "centre", "distractor", "noise")
FEATURE, CENTRE, DISTRACTOR, NOISE = range(4)

OPTIONS = {
    "data": "clusters",
    "setting": 1,  # clusters: noise σ = setting / √50 (Chen's settings 1 and 2)
    "num_train": 8192,
    "num_eval": 2000,
    "data_seed": 0,
    "seq_len": 8,  # tokens per example for subspaces / mean-shift / latent-regression
    "noise_tokens": 2,  # of which irrelevant N(0, I) tokens
    "angle": 60.0,  # subspaces: every principal angle between two groups' subspaces, degrees
    "rho": 3.0,  # mean-shift / latent-regression: distance of the cluster means from 0
}

PRESETS = {
    "tiny": Preset(
        task_args={"num_train": 1024, "num_eval": 256},
        model={},
        moe={"num_experts": 4},
        train={
            "steps": 60,
            "batch_size": 64,
            "lr": 3e-3,
            "warmup_steps": 5,
            "eval_every": 30,
            "probe_size": 32,
            "weight_decay": 0.0,
        },
    ),
    "quick": Preset(
        task_args={},
        model={},
        moe={"blocks": [-1], "num_experts": 4, "d_hidden": 64},
        train={
            "steps": 800,
            "batch_size": 64,
            "lr": 3e-3,
            "warmup_steps": 40,
            "eval_every": 400,
            "checkpoint_every": 400,
            "probe_size": 64,
            "weight_decay": 0.0,
        },
    ),
}


def orthonormal(d: int, n: int, g: torch.Generator) -> torch.Tensor:
    """n orthonormal vectors in R^d as columns (Gram-Schmidt of a Gaussian, via QR)."""
    q, r = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def subspace_bases(d: int, k: int, r: int, angle_deg: float, g: torch.Generator) -> torch.Tensor:
    """(k, d, r) orthonormal bases with every principal angle between two of them = ``angle_deg``."""
    cos_phi = math.cos(math.radians(angle_deg))
    theta = math.acos(math.sqrt(max(cos_phi, 0.0)))
    q = orthonormal(d, r * (k + 1), g)
    shared = q[:, :r]
    return torch.stack([math.cos(theta) * shared + math.sin(theta) * q[:, r * (c + 1) : r * (c + 2)] for c in range(k)])


def hermite3(z):
    return (z**3 - 3 * z) / math.sqrt(6)


def hermite2(z):
    return (z**2 - 1) / math.sqrt(2)


class _Constants:
    """The generator's fixed directions, drawn once from ``data_seed`` (shared by train and eval)."""

    def __init__(self, o: dict, g: torch.Generator):
        data = o["data"]
        if data == "clusters":
            vc = orthonormal(50, 8, g)
            self.v, self.c = vc[:, :4].T, vc[:, 4:].T  # (4, 50) each
        elif data == "subspaces":
            self.u = subspace_bases(32, 4, 4, o["angle"], g)  # (4, 32, 4)
            self.w = F.normalize(torch.randn(4, 4, generator=g), dim=1)  # (4, r)
        elif data == "mean-shift":
            q = orthonormal(16, 6, g)
            self.mu = q[:, :2].T  # (2, 16)
            self.w = q[:, 2:].T  # (4, 16), ⟂ every μ
        else:
            q = orthonormal(16, 9, g)
            self.v, self.wc, self.wg = q[:, :4].T, q[:, 4:8].T, q[:, 8]  # means, f_c and g directions
            self.s = torch.tensor([1.0, -1.0, 1.0, -1.0])


def generate(o: dict, n: int, const: _Constants, g: torch.Generator):
    """(x (n, T, d), target (n,), label (n, T), role (n, T), group (n,)) for generator ``o['data']``."""
    if o["data"] == "clusters":
        return _clusters(o, n, const, g)
    k, t, m = 4, int(o["seq_len"]), int(o["noise_tokens"])
    grp = torch.randint(k, (n,), generator=g)
    f = t - m
    if o["data"] == "subspaces":
        z = torch.randn(n, f, 4, generator=g)
        feat = torch.einsum("ndr,nfr->nfd", const.u[grp], z) + 0.1 * torch.randn(n, f, 32, generator=g)
        target = ((z @ const.w[grp].unsqueeze(-1)).squeeze(-1).sum(1) > 0).long()
    elif o["data"] == "mean-shift":
        sign = 1.0 - 2.0 * (grp % 2).float()
        mean = o["rho"] * sign[:, None] * const.mu[grp // 2]
        feat = mean[:, None, :] + torch.randn(n, f, 16, generator=g)
        target = ((feat @ const.w[grp].unsqueeze(-1)).squeeze(-1).sum(1) > 0).long()
    else:
        feat = o["rho"] * const.v[grp][:, None, :] + torch.randn(n, f, 16, generator=g)
        per_token = hermite3((feat * const.wc[grp][:, None, :]).sum(-1)) + const.s[grp][:, None] * hermite2(
            feat @ const.wg
        )
        target = per_token.mean(1) + 0.1 * torch.randn(n, generator=g)
    noise = torch.randn(n, m, feat.shape[-1], generator=g)
    x = torch.cat([feat, noise], 1)
    role = torch.cat([torch.full((n, f), FEATURE), torch.full((n, m), NOISE)], 1)
    perm = torch.argsort(torch.rand(n, t, generator=g), dim=1)  # noise tokens at random positions
    x = torch.gather(x, 1, perm[..., None].expand_as(x))
    role = torch.gather(role, 1, perm)
    label = torch.where(role == NOISE, -1, grp[:, None].expand(n, t))
    return x, target, label, role, grp


def _clusters(o: dict, n: int, const: _Constants, g: torch.Generator):
    """Chen et al. 2022's data (see the module docstring); label y in {0, 1} for y = -1 / +1."""
    k = torch.randint(4, (n,), generator=g)
    other = (k + torch.randint(1, 4, (n,), generator=g)) % 4  # k' != k, uniform
    y = torch.randint(2, (n,), generator=g)
    sign_y = 2.0 * y.float() - 1.0
    eps = 2.0 * torch.randint(2, (n,), generator=g).float() - 1.0
    alpha = 0.5 + 1.5 * torch.rand(n, generator=g)
    beta = 1.0 + torch.rand(n, generator=g)
    gamma = 0.5 + 2.5 * torch.rand(n, generator=g)
    sigma = float(o["setting"]) / math.sqrt(50)
    patches = (
        torch.stack(
            [
                (sign_y * alpha)[:, None] * const.v[k],
                beta[:, None] * const.c[k],
                (eps * gamma)[:, None] * const.v[other],
                sigma * torch.randn(n, 50, generator=g),
            ],
            1,
        )
        * 10.0
    )
    role = torch.tensor([FEATURE, CENTRE, DISTRACTOR, NOISE]).repeat(n, 1)
    perm = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    patches = torch.gather(patches, 1, perm[..., None].expand_as(patches))
    role = torch.gather(role, 1, perm)
    label = torch.where(role == NOISE, -1, k[:, None].expand(n, 4))
    return patches, y, label, role, k


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, with timm ``layers.Mlp``'s children and init (same parameters, names and
    outputs at drop 0): importing timm costs ~1-1.5 s of CPU per run process, more than a structure run's
    evaluation."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TokenMLP(nn.Module):
    """Pre-norm residual MLP block applied to each token alone; ``attn`` only exposes the normed
    tokens to moefy's context hook (routers that read context), mixing nothing."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x):
        self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class StructureNet(nn.Module):
    """Linear token embedding, ``depth`` TokenMLP blocks (``.blocks`` for moefy), LN, mean pool, head."""

    def __init__(self, in_dim: int, out_dim: int, dim: int = 32, depth: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(*[TokenMLP(dim, int(dim * mlp_ratio)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


@register_task(
    "structure", "ground-truth routing: Chen et al. clusters, subspaces, mean-shift, Kawata latent regression"
)
class StructureTask(Task):
    """Known token groups and roles; headline accuracy (or R² for latent-regression)."""

    headline = "score"
    higher_is_better = True
    label_kind = "group"
    default_model = {"dim": 32, "depth": 2, "mlp_ratio": 2.0}
    presets = PRESETS
    role_names = list(ROLES)

    def __init__(self, **options):
        super().__init__(**options)
        self.opts = o = self.check_options(options, OPTIONS)
        if o["data"] not in GENERATORS:
            raise ValueError(f"structure task_args.data must be one of {list(GENERATORS)}, got {o['data']!r}")
        if o["setting"] not in (1, 2):
            raise ValueError(f"structure task_args.setting must be 1 or 2 (Chen's noise levels), got {o['setting']!r}")
        if not 0 <= int(o["noise_tokens"]) < int(o["seq_len"]):
            raise ValueError(f"structure task_args.noise_tokens must be in [0, seq_len), got {o['noise_tokens']!r}")
        if not 0 < float(o["angle"]) <= 90:
            raise ValueError(f"structure task_args.angle must be in (0, 90] degrees, got {o['angle']!r}")
        self.regression = o["data"] == "latent-regression"
        # subspaces: the rank of the true U_c, for the principal angles of eigenbasis routers (the angles are
        # taken in the MoE layer's input space, against each group's principal subspace there: the blocks
        # before the MoE are nonlinear, so U_c itself has no image subspace; moebench.training.metrics)
        self.subspace_rank = 4 if o["data"] == "subspaces" else None
        self.label_names = [f"group{i}" for i in range(4)]
        self._datasets = None
        self._layers: dict[int, list] = {}

    def datasets(self):
        if self._datasets is None:
            g = torch.Generator().manual_seed(int(self.opts["data_seed"]))
            const = _Constants(self.opts, g)
            made = [generate(self.opts, int(n), const, g) for n in (self.opts["num_train"], self.opts["num_eval"])]
            self._datasets = tuple(TensorDataset(x.float(), t, lab, role, grp) for x, t, lab, role, grp in made)
        return self._datasets

    @property
    def in_dim(self) -> int:
        return {"clusters": 50, "subspaces": 32}.get(self.opts["data"], 16)

    def build_model(self, model: dict, moe: dict | None) -> nn.Module:
        cfg = self.check_options(dict(model), self.default_model)
        net = StructureNet(
            self.in_dim,
            1 if self.regression else 2,
            dim=int(cfg["dim"]),
            depth=int(cfg["depth"]),
            mlp_ratio=float(cfg["mlp_ratio"]),
        )
        return apply_moe(net, moe)

    def forward(self, model, batch):
        from moebench.core.layer import moe_layers

        layers = self._layers.setdefault(id(model), moe_layers(model))
        for layer in layers:  # the true group, for the oracle control (RoutingContext.group)
            layer.pending_group = batch[4][:, None].expand(batch[2].shape)
        out = model(batch[0])
        return out.squeeze(-1) if self.regression else out

    def loss(self, outputs, batch):
        if self.regression:
            return F.mse_loss(outputs.float(), batch[1].float())
        return F.cross_entropy(outputs.float(), batch[1])

    @torch.no_grad()
    def evaluate(self, model, loader, device):
        from moebench.training.train import to_device

        outs, targets = [], []
        for batch in loader:
            batch = to_device(batch, device)
            outs.append(self.forward(model, batch).float().cpu())
            targets.append(batch[1].cpu())
        out, target = torch.cat(outs), torch.cat(targets)
        if self.regression:
            err = (out - target.float()) ** 2
            var = float(((target - target.mean()) ** 2).mean()) or 1.0
            items = (1.0 - err / var).numpy()  # mean = R²
            return {
                "score": float(items.mean()),
                "r2": float(items.mean()),
                "mse": float(err.mean()),
                "items": {"headline": items, "sq_error": err.numpy()},
            }
        hit = (out.argmax(-1) == target).numpy().astype("int8")
        loss = float(F.cross_entropy(out, target))
        return {
            "score": float(hit.mean()),
            "accuracy": float(hit.mean()),
            "loss": loss,
            "items": {"headline": hit, "correct": hit},
        }

    def token_labels(self, batch, layer_name, tokens_per_sample):
        return batch[2] if tokens_per_sample == batch[2].shape[1] else None

    def token_roles(self, batch, layer_name, tokens_per_sample):
        """Each token's role (index into ``role_names``), for the per-role recovery metrics."""
        return batch[3] if tokens_per_sample == batch[3].shape[1] else None
