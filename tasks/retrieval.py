"""Image-text retrieval: COCO captions / Flickr30K (Karpathy split) or, offline, compositional
Fashion-MNIST canvases whose captions need both item identity and position.

Model: an open_clip CLIP (named, or a tiny custom config for CPU) with MoE layers in both towers,
trained with the CLIP contrastive loss. Headline: mean of image->text and text->image R@1 (also R@5,
R@10 both ways). Specialisation label: for image-tower tokens, the Fashion-MNIST item under the patch
(or background); text-tower tokens carry no label (their towers never share experts)."""

from __future__ import annotations

import torch

from moebench.core.models import build_model
from moebench.core.registry import register_task
from moebench.core.task import Preset, Task

from .common import apply_moe, with_prefix_tokens

OPTIONS = {
    "data": "compositional",  # compositional | coco | flickr30k | karpathy
    "root": None,  # coco: folder with annotations/ and train2017/, val2017/
    "split_file": None,  # flickr30k / karpathy: dataset_flickr30k.json (Karpathy split)
    "image_dir": None,  # flickr30k / karpathy: folder of the images
    "n_train": 10000,  # compositional only
    "n_eval": 1000,
    "canvas": 56,
    "data_seed": 0,
}

TINY_CLIP = {
    "family": "open_clip",
    "name": "custom",
    "embed_dim": 64,
    "vision_cfg": {"image_size": 56, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"width": 64, "heads": 2, "layers": 2},  # context_length / vocab_size from the tokenizer
}

PRESETS = {
    "tiny": Preset(
        task_args={"n_train": 512, "n_eval": 128},
        model=TINY_CLIP,
        moe={"blocks": "last-2", "num_experts": 4},
        train={"steps": 30, "batch_size": 64, "lr": 2e-3, "warmup_steps": 5, "eval_every": 15, "probe_size": 64},
    ),
    # quick: 300 steps measured mean R@1 0.032 (random: 0.001) in ~60 s of one CPU thread (softmax-topk,
    # seed 0); 150 steps gave 0.011. 250 keeps the quick grid near 15 minutes; 500 eval canvases keep
    # 5 evaluations (the stability curve) cheap.
    "quick": Preset(
        task_args={"n_train": 10000, "n_eval": 500},
        model=TINY_CLIP,
        moe={"blocks": "last-2", "num_experts": 8},
        train={
            "steps": 250,
            "batch_size": 64,
            "lr": 3e-3,
            "warmup_steps": 25,
            "eval_every": 50,
            "probe_size": 128,
            "weight_decay": 0.1,
        },
    ),
}


def retrieval_recall(similarity: torch.Tensor, text_to_image: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """R@K both ways from an (images x texts) similarity matrix; ``text_to_image[t]`` is caption t's image.

    image->text: an image scores a hit at K if any of its captions is among its K most similar texts.
    text->image: a caption scores a hit at K if its image is among its K most similar images."""
    num_images, num_texts = similarity.shape
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(text_to_image.shape)}")
    owner = text_to_image.unsqueeze(0) == torch.arange(num_images).unsqueeze(1)  # (I, T) ground truth
    # rank of the best correct caption for each image = number of texts scoring strictly higher
    best_correct = similarity.masked_fill(~owner, float("-inf")).max(1).values
    i2t_rank = (similarity > best_correct.unsqueeze(1)).sum(1)
    correct_sim = similarity[text_to_image, torch.arange(num_texts)]
    t2i_rank = (similarity > correct_sim.unsqueeze(0)).sum(0)
    out: dict = {}  # floats, and mean_r1 None without R@1
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
    out["mean_r1"] = (out["i2t_r1"] + out["t2i_r1"]) / 2 if 1 in ks else None
    return out


def retrieval_items(similarity: torch.Tensor, text_to_image: torch.Tensor) -> dict:
    """Per-item outputs: images first, then captions. ``rank`` is the retrieval rank (0 = best) of the
    item's correct match; ``headline`` is each item's share of mean R@1 = (i2t R@1 + t2i R@1) / 2, i.e.
    hit * N / (2 * I) for an image and hit * N / (2 * T) for a caption (N = I + T items), so its mean
    over all items equals the headline exactly."""
    num_images, num_texts = similarity.shape
    owner = text_to_image.unsqueeze(0) == torch.arange(num_images).unsqueeze(1)
    best_correct = similarity.masked_fill(~owner, float("-inf")).max(1).values
    i2t_rank = (similarity > best_correct.unsqueeze(1)).sum(1)
    t2i_rank = (similarity > similarity[text_to_image, torch.arange(num_texts)].unsqueeze(0)).sum(0)
    n = num_images + num_texts
    headline = torch.cat(
        [(i2t_rank == 0).double() * n / (2 * num_images), (t2i_rank == 0).double() * n / (2 * num_texts)]
    )
    return {
        "headline": headline.numpy(),
        "rank": torch.cat([i2t_rank, t2i_rank]).numpy().astype("int32"),
        "is_image": torch.cat([torch.ones(num_images), torch.zeros(num_texts)]).numpy().astype("int8"),
    }


@register_task("retrieval", "image-text retrieval: COCO / Flickr30K, offline compositional canvases; mean R@1")
class RetrievalTask(Task):
    """CLIP-style contrastive training; mean of image->text and text->image R@1."""

    headline = "mean_r1"
    higher_is_better = True
    margin = 0.005
    margin_reason = "half a point of mean R@1: below the gains retrieval papers report on COCO / Flickr30K"
    label_kind = "item"
    default_model = TINY_CLIP
    presets = PRESETS

    def __init__(self, **options):
        super().__init__(**options)
        self.opts = self.check_options(options, OPTIONS)
        if self.opts["data"] not in ("compositional", "coco", "flickr30k", "karpathy"):
            raise ValueError(
                f"retrieval option data must be compositional, coco, flickr30k or karpathy; got {self.opts['data']!r}"
            )
        self._datasets = None
        self._tokenizer = None
        from .datasets import FASHION_MNIST_CLASSES

        self.label_names = [c.lower() for c in FASHION_MNIST_CLASSES] + ["background"]

    @property
    def offline(self) -> bool:
        return self.opts["data"] == "compositional"

    # -- data --------------------------------------------------------------------------------------
    def datasets(self):
        if self._datasets is None:
            o = self.opts
            if self.offline:
                from .datasets import compositional_datasets

                self._datasets = compositional_datasets(
                    n_train=o["n_train"], n_eval=o["n_eval"], canvas=o["canvas"], seed=o["data_seed"]
                )
                self._tokenizer = self._datasets[0].tokenizer
            else:
                self._datasets = self._real_datasets()
        return self._datasets

    def _real_datasets(self):
        import open_clip

        from .datasets import coco_retrieval_datasets, karpathy_retrieval_datasets

        o, cfg = self.opts, self._model_cfg or self.default_model
        size = cfg.get("vision_cfg", {}).get("image_size", 224)
        train_tf = open_clip.image_transform(size, is_train=True)
        eval_tf = open_clip.image_transform(size, is_train=False)
        self._tokenizer = open_clip.get_tokenizer(cfg.get("name", "ViT-B-32"))
        if o["data"] == "coco":
            if not o["root"]:
                raise ValueError("retrieval with data: coco needs task_args.root, the folder holding annotations/")
            return coco_retrieval_datasets(o["root"], train_tf, eval_tf, self._tokenizer)
        if not (o["split_file"] and o["image_dir"]):
            raise ValueError(
                f"retrieval with data: {o['data']} needs task_args.split_file (the Karpathy split JSON, "
                f"e.g. dataset_flickr30k.json) and task_args.image_dir"
            )
        return karpathy_retrieval_datasets(o["split_file"], o["image_dir"], train_tf, eval_tf, self._tokenizer)

    _model_cfg: dict | None = None

    # -- model -------------------------------------------------------------------------------------
    def build_model(self, model: dict, moe: dict | None):
        cfg = {**(model or self.default_model)}
        self._model_cfg = cfg
        if self.offline and cfg.get("name") == "custom":
            tok = self.datasets()[0].tokenizer
            cfg["text_cfg"] = {
                **cfg.get("text_cfg", {}),
                "context_length": tok.context_length,
                "vocab_size": tok.vocab_size,
            }
            cfg["vision_cfg"] = {**cfg.get("vision_cfg", {}), "image_size": self.opts["canvas"]}
        return apply_moe(build_model(cfg), moe)

    # -- steps -------------------------------------------------------------------------------------
    @staticmethod
    def _rgb(images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def forward(self, model, batch):
        image_features = model.encode_image(self._rgb(batch[0]), normalize=True)
        text_features = model.encode_text(batch[1], normalize=True)
        return image_features, text_features, model.logit_scale.exp()

    def loss(self, outputs, batch):
        from open_clip.loss import ClipLoss

        image_features, text_features, scale = outputs
        return ClipLoss()(image_features.float(), text_features.float(), scale.float())

    @torch.no_grad()
    def evaluate(self, model, loader, device):
        from moebench.core.device import to_device

        dataset = loader.dataset
        while not hasattr(dataset, "tokenized_texts") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset  # unwrap Subset
        images = []
        for batch in loader:
            batch = to_device(batch, device)
            images.append(model.encode_image(self._rgb(batch[0]), normalize=True).float())
        texts = dataset.tokenized_texts()
        text_feats = [
            model.encode_text(t.to(device), normalize=True).float() for t in texts.split(loader.batch_size or 256)
        ]
        sim = torch.cat(images) @ torch.cat(text_feats).T
        t2i = dataset.text_to_image
        if sim.shape[0] != int(t2i.max()) + 1:
            raise ValueError("retrieval evaluation needs the whole eval set in order (no shuffling or subsetting)")
        return {**retrieval_recall(sim.cpu(), t2i), "items": retrieval_items(sim.cpu(), t2i)}

    def token_labels(self, batch, layer_name, tokens_per_sample):
        if not layer_name.startswith("visual.") or len(batch) < 4:
            return None  # text tokens, or real data without per-cell items
        from .datasets import patch_cell_labels

        patch = self._model_cfg["vision_cfg"]["patch_size"] if self._model_cfg else 8
        labels = patch_cell_labels(batch[3], self.opts["canvas"], patch)
        labels = torch.where(labels < 0, len(self.label_names) - 1, labels)  # empty cell -> background
        return with_prefix_tokens(labels, tokens_per_sample)
