"""Toy task: classify short sequences of Gaussian-mixture tokens, in seconds on a CPU.

Each of K mixture components has a fixed random mean in R^in_dim. A sequence of class y has
``seq_len`` tokens; each token comes from component y with probability ``purity`` and from a uniformly
drawn component otherwise, plus isotropic noise. The label is y, so the model must pool evidence over
tokens. Every token's component is its specialisation label: an expert that specialises on a
component gives high mutual information between expert choice and label.

It exists to test the training loop, grids, launchers and SLURM end to end, not to rank routers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from moebench.core.registry import register_task
from moebench.core.task import Preset, Task

from .common import apply_moe

DEFAULT_OPTIONS = {
    "num_train": 2048,
    "num_eval": 512,
    "num_classes": 4,
    "seq_len": 16,
    "in_dim": 8,
    "separation": 2.0,  # std of the component means
    "noise": 1.0,  # std of the token noise
    "purity": 0.5,  # share of a sequence's tokens drawn from its own class's component
    "data_seed": 0,
}

PRESETS = {
    "tiny": Preset(
        task_args={"num_train": 512, "num_eval": 256},
        model={},
        moe={"num_experts": 4},
        train={
            "steps": 60,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 5,
            "eval_every": 20,
            "checkpoint_every": 20,
            "probe_size": 32,
        },
    ),
    "quick": Preset(
        task_args={},
        model={},
        moe={"num_experts": 4},
        train={
            "steps": 300,
            "batch_size": 32,
            "lr": 3e-3,
            "warmup_steps": 20,
            "eval_every": 100,
            "checkpoint_every": 100,
            "probe_size": 64,
        },
    ),
    "full": Preset(
        task_args={"num_train": 16384, "num_eval": 2048},
        model={"dim": 64, "depth": 4, "num_heads": 4},
        moe={"num_experts": 8},
        train={
            "steps": 2000,
            "batch_size": 64,
            "lr": 1e-3,
            "warmup_steps": 100,
            "eval_every": 250,
            "checkpoint_every": 250,
            "probe_size": 128,
        },
    ),
}


class ToyTransformer(nn.Module):
    """Linear token embedding + learned positions, timm ``Block``s, mean pooling, linear head.
    ``.blocks`` is an ``nn.Sequential`` of timm blocks so ``moebench.core.moefy`` can MoE-fy their MLPs."""

    def __init__(
        self,
        in_dim: int,
        seq_len: int,
        num_classes: int,
        dim: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
    ):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos_embed[:, : x.shape[1]]
        h = self.blocks(h)
        return self.head(self.norm(h).mean(1))


@register_task("toy", "Gaussian-mixture token sequences, 2 timm blocks: seconds on CPU (tests, smoke runs)")
class ToyTask(Task):
    """Classify which mixture component dominates a sequence; tokens labelled by their component."""

    headline = "accuracy"
    higher_is_better = True
    margin = 0.02
    margin_reason = "two points of accuracy: the toy task only checks that the machinery works"
    label_kind = "component"
    default_model = {"dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    presets = PRESETS

    def __init__(self, **options):
        super().__init__(**options)
        self.opts = self.check_options(options, DEFAULT_OPTIONS)
        o = self.opts
        if o["num_classes"] < 2 or o["seq_len"] < 1 or o["in_dim"] < 1:
            raise ValueError(f"toy task needs num_classes >= 2, seq_len >= 1, in_dim >= 1; got {o}")
        if not 0.0 <= o["purity"] <= 1.0:
            raise ValueError(f"toy task option purity must be in [0, 1], got {o['purity']}")
        self.label_names = [f"component{i}" for i in range(o["num_classes"])]
        self._datasets = None

    # -- data --------------------------------------------------------------------------------------
    def _make(self, n: int, g: torch.Generator, means: torch.Tensor):
        o = self.opts
        k, t = o["num_classes"], o["seq_len"]
        y = torch.randint(k, (n,), generator=g)
        own = torch.rand(n, t, generator=g) < o["purity"]
        other = torch.randint(k, (n, t), generator=g)
        comp = torch.where(own, y[:, None], other)
        x = means[comp] + o["noise"] * torch.randn(n, t, o["in_dim"], generator=g)
        return TensorDataset(x.float(), y, comp)

    def datasets(self):
        if self._datasets is None:
            o = self.opts
            g = torch.Generator().manual_seed(int(o["data_seed"]))
            means = o["separation"] * torch.randn(o["num_classes"], o["in_dim"], generator=g)
            self._datasets = (self._make(o["num_train"], g, means), self._make(o["num_eval"], g, means))
        return self._datasets

    # -- model -------------------------------------------------------------------------------------
    def build_model(self, model: dict, moe: dict | None) -> nn.Module:
        model = dict(model)
        weights, strict = model.pop("pretrained", None), model.pop("pretrained_strict", True)
        cfg = self.check_options(model, self.default_model)
        net = ToyTransformer(
            self.opts["in_dim"],
            self.opts["seq_len"],
            self.opts["num_classes"],
            dim=int(cfg["dim"]),
            depth=int(cfg["depth"]),
            num_heads=int(cfg["num_heads"]),
            mlp_ratio=float(cfg["mlp_ratio"]),
        )
        if weights:  # local weights (e.g. a grid's dense pretrain), as `model.pretrained` means elsewhere
            from moebench.core.models import load_checkpoint

            load_checkpoint(net, str(weights), strict=bool(strict))
        return apply_moe(net, moe)

    # -- steps -------------------------------------------------------------------------------------
    def forward(self, model, batch):
        return model(batch[0])

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.float(), batch[1])

    @torch.no_grad()
    def evaluate(self, model, loader, device):
        from moebench.core.device import to_device

        correct, loss_sum, n, hits = 0, 0.0, 0, []
        for batch in loader:
            batch = to_device(batch, device)
            logits = self.forward(model, batch).float()
            loss_sum += float(F.cross_entropy(logits, batch[1], reduction="sum"))
            hit = (logits.argmax(-1) == batch[1]).reshape(-1)
            hits.append(hit.cpu())
            correct += int(hit.sum())
            n += int(batch[1].numel())
        item_hits = torch.cat(hits).numpy().astype("int8") if hits else None
        return {
            "accuracy": correct / max(n, 1),
            "loss": loss_sum / max(n, 1),
            "items": {"headline": item_hits, "correct": item_hits},
        }

    def token_labels(self, batch, layer_name, tokens_per_sample):
        comp = batch[2]
        if tokens_per_sample != comp.shape[1]:
            return None
        return comp
