"""``ermoe-released``: the method ERMoE's released code runs (image-level routing over whole-backbone
experts), as a router name a grid can use. It is not a token router: tasks whose ``build_model``
goes through ``tasks.common.apply_moe`` (classification, brain age) build the
`moebench.core.image_moe.ErmoeReleasedModel` around their backbone instead of moefying it."""

from __future__ import annotations

import copy

from torch import nn

from moebench.core.config import option
from moebench.core.image_moe import ErmoeReleasedModel
from moebench.core.registry import register_router
from moebench.core.routing import Router


@register_router(
    "ermoe-released",
    "ERMoE's released code: image-level eigen-attention score over frozen backbone "
    "copies with their own heads, threshold 0.5, free expert 0 (a model family)",
)
class ErmoeReleasedRouter(Router):
    """Options: ``top_k`` (2), ``threshold`` (0.5), ``free_experts`` ([0]), ``freeze_experts`` (true: only the
    heads train, as released), ``expert_noise`` (0: identical copies, every score ties; > 0 perturbs each
    expert's backbone by that multiple of each weight's std, its own seed, so scores differ).
    ``moe.blocks`` / ``d_hidden`` / ``mode`` do not apply: every expert is a whole backbone."""

    sequence_refusal = "it is image-level already (one decision per image, whole-backbone experts)"

    image_level = True
    options = {
        "top_k": option(2, "int", minimum=1, doc="experts per image (<= num_experts)"),
        "threshold": option(0.5, "float", minimum=0.0, finite=True, doc="score threshold"),
        "free_experts": option(None, "indices", nullable=True, doc="always-on experts; null: [0]"),
        "freeze_experts": option(True, "bool", doc="only the heads train, as released"),
        "expert_noise": option(
            0.0, "float", minimum=0.0, finite=True, doc="perturbation of each expert copy (x weight std)"
        ),
        "num_patches": option(None, "int", minimum=1, nullable=True, doc="set by the model build (the score's cost)"),
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        threshold: float = 0.5,
        free_experts: list[int] | None = None,
        freeze_experts: bool = True,
        expert_noise: float = 0.0,
        num_patches: int | None = None,
    ):
        super().__init__(d_model, num_experts, top_k)
        free = [0] if free_experts is None else list(free_experts)
        if any(e >= num_experts for e in free):
            raise ValueError(
                f"ermoe-released option free_experts must list expert indices in [0, {num_experts - 1}], "
                f"got {free_experts!r}"
            )
        self.threshold, self.free_experts = float(threshold), tuple(int(e) for e in free)
        self.freeze_experts, self.expert_noise = freeze_experts, float(expert_noise)
        self.num_patches = num_patches  # set when the model is built: the score's cost depends on it

    @property
    def active_experts_per_token(self) -> float:
        return float(self.num_experts)  # every expert's backbone runs on every image to be scored

    def flops_per_token(self) -> float:
        """Per image: for each expert, the Gram matrix (2 P^2 d), eigh (~9 P^3), U^T A U (4 P^3), the
        head-averaged attention recomputed (2 P^2 d). An estimate (eigh's cost is iterative)."""
        P, d = self.num_patches or 0, self.d_model
        return float(self.num_experts * (4 * P * P * d + 13 * P**3))

    def wrap_experts(self, experts: nn.Module) -> nn.Module:
        raise ValueError(
            "router 'ermoe-released' routes whole images over whole-backbone experts, so it cannot sit in a "
            "MoE layer: use it as moe.router in a task whose model build supports it (classification, "
            "brain-age), which builds moebench.core.image_moe.ErmoeReleasedModel around the backbone"
        )

    @classmethod
    def build_model(cls, backbone: nn.Module, moe: dict) -> ErmoeReleasedModel:
        """The released model around ``backbone`` from a spec's ``moe`` section."""
        if moe.get("router_init_std") is not None:
            raise ValueError(
                "moe.router_init_std cannot apply to router 'ermoe-released': it has no learned gate "
                "(it scores images by the backbone's own attention); leave moe.router_init_std null for it"
            )
        head = getattr(backbone, "head", None)
        d = head.in_features if isinstance(head, nn.Linear) else 0
        args = copy.deepcopy(moe.get("router_args") or {})
        router = cls(d, moe["num_experts"], **args)
        patch_embed = getattr(backbone, "patch_embed", None)
        router.num_patches = getattr(patch_embed, "num_patches", None) or getattr(backbone, "num_patches", None)
        return ErmoeReleasedModel(
            backbone,
            router,
            router.threshold,
            router.free_experts,
            freeze_experts=router.freeze_experts,
            expert_noise=router.expert_noise,
        )
