"""Image classification: ImageNet-1k (any ImageFolder with train/ and val/), CIFAR-10 / CIFAR-100
(torchvision's on-disk format under ``root``) or, offline, Fashion-MNIST.

Model: a timm ViT (any timm name, or a tiny custom config for CPU), MoE-fied by ``moebench.core.moefy``.
Headline: top-1 accuracy (also top-5). Specialisation label: the image's class, on every token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moebench.core.models import build_model
from moebench.core.registry import register_task
from moebench.core.task import Preset, Task

from .common import apply_moe, topk_correct

OPTIONS = {
    "data": "fashion-mnist",  # cifar10 | cifar100 (with root), or the path of an ImageFolder root (train/, val/)
    "root": None,  # cifar10 / cifar100: the folder holding cifar-10-batches-py/ or cifar-100-python/
    "train_size": None,  # None = all
    "eval_size": None,
    "data_seed": 0,
    "img_size": None,  # ImageFolder: timm transforms at this resolution (null: 224);
    # CIFAR: resize the 32 px images to it (null: keep 32)
    "mixup": 0.0,  # timm Mixup alpha (0 = off); cutmix / label smoothing below
    "cutmix": 0.0,
    "label_smoothing": 0.0,
    "auto_augment": None,  # ImageFolder only: timm auto-augment policy, e.g. "rand-m9-mstd0.5-inc1"
}

TINY_VIT = {
    "family": "timm",
    "name": "vit-custom",
    "img_size": 28,
    "patch_size": 7,
    "in_chans": 1,
    "embed_dim": 64,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "num_classes": 10,
    "global_pool": "avg",
    "class_token": False,
}

PRESETS = {
    "tiny": Preset(
        task_args={"train_size": 1024, "eval_size": 512},
        model=TINY_VIT,
        moe={"blocks": "last-2", "num_experts": 4},
        train={"steps": 40, "batch_size": 64, "lr": 2e-3, "warmup_steps": 5, "eval_every": 20, "probe_size": 64},
    ),
    # quick: measured 0.81 top-1 (softmax-topk, seed 0) in ~25 s of one CPU thread
    "quick": Preset(
        task_args={"train_size": 20000, "eval_size": 2000},
        model=TINY_VIT,
        moe={"blocks": "last-2", "num_experts": 8},
        train={
            "steps": 300,
            "batch_size": 64,
            "lr": 2e-3,
            "warmup_steps": 30,
            "eval_every": 75,
            "probe_size": 256,
            "weight_decay": 0.05,
        },
    ),
}


@register_task(
    "classification", "image classification: ImageNet ImageFolder, CIFAR-10/100, offline Fashion-MNIST; top-1"
)
class ClassificationTask(Task):
    """Top-1 / top-5 on ImageFolder data (ImageNet layout), CIFAR-10/100 or offline Fashion-MNIST."""

    headline = "top1"
    higher_is_better = True
    margin = 0.01
    margin_reason = "one point of top-1: below what image-classification papers report as a gain"
    label_kind = "class"
    default_model = TINY_VIT
    presets = PRESETS

    def __init__(self, **options):
        super().__init__(**options)
        self.opts = self.check_options(options, OPTIONS)
        if self.opts["root"] is not None and not self.cifar:
            raise ValueError(
                f"classification task_args.root is only read for data cifar10 / cifar100 (got data "
                f"{self.opts['data']!r}); remove root, or set data: cifar10 / cifar100"
            )
        self._datasets = None
        self._mixup = None
        if self.opts["mixup"] or self.opts["cutmix"]:
            from timm.data import Mixup

            self._mixup = Mixup(
                mixup_alpha=self.opts["mixup"],
                cutmix_alpha=self.opts["cutmix"],
                label_smoothing=self.opts["label_smoothing"],
                num_classes=self.num_classes,
            )

    @property
    def offline(self) -> bool:
        return self.opts["data"] == "fashion-mnist"

    @property
    def cifar(self) -> str | None:
        """``cifar10`` / ``cifar100`` when the data is CIFAR, else None."""
        from .datasets import CIFAR_NUM_CLASSES

        return self.opts["data"] if self.opts["data"] in CIFAR_NUM_CLASSES else None

    @property
    def num_classes(self) -> int:
        from .datasets import CIFAR_NUM_CLASSES

        if self.cifar:
            return CIFAR_NUM_CLASSES[self.cifar]
        return 10 if self.offline else len(self.datasets()[0].classes)

    def datasets(self):
        if self._datasets is None:
            o = self.opts
            if self.offline:
                from .datasets import fashion_mnist_datasets

                self._datasets = fashion_mnist_datasets(
                    train_size=o["train_size"], eval_size=o["eval_size"], seed=o["data_seed"]
                )
            elif self.cifar:
                from .datasets import cifar_datasets

                self._datasets = cifar_datasets(
                    o["root"],
                    self.cifar,
                    train_size=o["train_size"],
                    eval_size=o["eval_size"],
                    seed=o["data_seed"],
                    img_size=o["img_size"] or 32,
                )
            else:
                from timm.data import create_transform

                from .datasets import imagefolder_datasets

                size = o["img_size"] or 224
                train_tf = create_transform(size, is_training=True, auto_augment=o["auto_augment"])
                eval_tf = create_transform(size, is_training=False)
                self._datasets = _subsets(imagefolder_datasets(o["data"], train_tf, eval_tf), o)
            self.label_names = list(self._datasets[0].classes)
        return self._datasets

    def build_model(self, model: dict, moe: dict | None):
        cfg = {**(model or self.default_model)}
        if not self.offline and cfg.get("num_classes") is None:
            cfg["num_classes"] = self.num_classes
        return apply_moe(build_model(cfg), moe)

    def forward(self, model, batch):
        images, labels = batch[0], batch[1]
        if model.training and self._mixup is not None:
            images, soft = self._mixup(images, labels)
            return model(images), soft  # the loss needs the mixed targets
        return model(images)

    def loss(self, outputs, batch):
        if isinstance(outputs, tuple):  # (logits, mixed soft targets) from forward()
            logits, soft = outputs
            return torch.sum(-soft * F.log_softmax(logits.float(), -1), -1).mean()
        return F.cross_entropy(outputs.float(), batch[1], label_smoothing=self.opts["label_smoothing"])

    @torch.no_grad()
    def evaluate(self, model, loader, device):
        from moebench.core.device import to_device

        hits, loss_sum, n, top1_hits = {1: 0, 5: 0}, 0.0, 0, []
        for batch in loader:
            batch = to_device(batch, device)
            logits = self.forward(model, batch).float()
            loss_sum += float(F.cross_entropy(logits, batch[1], reduction="sum"))
            for k, v in topk_correct(logits, batch[1]).items():
                hits[k] += v
            top1_hits.append((logits.argmax(-1) == batch[1]).cpu())
            n += int(batch[1].numel())
        correct = torch.cat(top1_hits).numpy().astype("int8") if top1_hits else None
        return {
            "top1": hits[1] / max(n, 1),
            "top5": hits[5] / max(n, 1),
            "loss": loss_sum / max(n, 1),
            "items": {"headline": correct, "correct": correct},
        }

    def token_labels(self, batch, layer_name, tokens_per_sample):
        labels = batch[1]
        return labels.unsqueeze(1).expand(labels.shape[0], tokens_per_sample)


def _subsets(pair, o):
    """Seeded subsets of ImageFolder splits when train_size / eval_size are set."""
    from torch.utils.data import Subset

    out = []
    for ds, size in zip(pair, (o["train_size"], o["eval_size"])):
        if size is not None and size < len(ds):
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(o["data_seed"]))[:size]
            sub = Subset(ds, idx.sort().values.tolist())
            sub.classes = ds.classes
            ds = sub
        out.append(ds)
    return tuple(out)
