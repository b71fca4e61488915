"""Each task adapter on a tiny fixture in its real public format: loading, one training step through
the shared loop's pieces, the metric on known values, and the specialisation labels."""

from __future__ import annotations

import pytest
import torch
from real_format_fixtures import make_bids, make_coco, make_png

from moebench.core.layer import moe_layers
from moebench.core.registry import TASKS
from moebench.tasks.brain_age import bias_correction, pearson_r
from moebench.tasks.common import with_prefix_tokens
from moebench.tasks.datasets import cache
from moebench.tasks.retrieval import retrieval_recall

MOE = {
    "blocks": "last-2",
    "num_experts": 4,
    "router": "softmax-topk",
    "router_args": {"top_k": 2},
    "d_hidden": None,
    "capacity_factor": None,
    "upcycle": True,
}


@pytest.fixture(autouse=True)
def _cache_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "cache"))
    torch.manual_seed(0)


def _one_step(task, model, batch, lr: float = 1e-3) -> tuple[float, float]:
    """Loss before and after one gradient step on the same batch (it must drop)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # plain descent: a small step must lower the loss
    model.train()
    loss = task.loss(task.forward(model, batch), batch) + sum(m.aux_loss for m in moe_layers(model))
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = task.loss(task.forward(model, batch), batch)
    return float(loss.detach()), float(after)


def _loader(ds, n):
    return torch.utils.data.DataLoader(ds, batch_size=n, shuffle=False)


# -- metrics on known values ---------------------------------------------------------------------
def test_retrieval_recall_on_a_hand_made_similarity_matrix():
    # 3 images, 5 captions: captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    t2i = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.2, 0.3],  # image 0: best text is 1 (its own)            -> i2t rank 0
            [0.8, 0.0, 0.7, 0.1, 0.0],  # image 1: text 0 (wrong) beats 2 (own)        -> i2t rank 1
            [0.5, 0.0, 0.9, 0.6, 0.4],  # image 2: texts 2,3,0 beat its own text 4     -> i2t rank 3
        ]
    )
    r = retrieval_recall(sim, t2i, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == pytest.approx(2 / 3)
    # text 0: image 1 (0.8) beats image 0 (0.1) -> miss at 1, miss at 2 (image 2 has 0.5)
    # text 1: own image 0.9 -> hit; text 2: image 2 (0.9) beats own 0.7 -> rank 1
    # text 3: image 2 (0.6) beats own 0.1, image 0 0.2 too -> rank 2; text 4: own 0.4, image 0 0.3 -> hit
    assert r["t2i_r1"] == pytest.approx(2 / 5) and r["t2i_r2"] == pytest.approx(3 / 5)
    assert r["mean_r1"] == pytest.approx((1 / 3 + 2 / 5) / 2)
    # per-item outputs: images first (ranks 0, 1, 3), then captions (ranks 2, 0, 1, 2, 0); the headline
    # items average to mean R@1 exactly
    from moebench.tasks.retrieval import retrieval_items

    items = retrieval_items(sim, t2i)
    assert items["rank"].tolist() == [0, 1, 3, 2, 0, 1, 2, 0]
    assert items["is_image"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert items["headline"].mean() == pytest.approx(r["mean_r1"])


def test_bias_correction_recovers_a_linear_bias_and_pearson():
    age = torch.tensor([20.0, 40.0, 60.0, 80.0])
    pred = 0.5 * age + 25.0  # regression to the mean
    slope, intercept = bias_correction(pred, age)
    assert slope == pytest.approx(0.5) and intercept == pytest.approx(25.0)
    assert pearson_r(pred, age) == pytest.approx(1.0)
    assert pearson_r(-pred, age) == pytest.approx(-1.0)


def test_prefix_tokens_are_unlabelled():
    out = with_prefix_tokens(torch.tensor([[3, 4]]), 3)
    assert out.tolist() == [[-1, 3, 4]]
    assert with_prefix_tokens(torch.tensor([[3, 4]]), 1) is None


# -- classification: ImageFolder ---------------------------------------------------------------
def test_classification_on_a_two_class_imagefolder(tmp_path):
    for split in ("train", "val"):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            for i in range(4):
                make_png(tmp_path / split / cls / f"{i}.png", colour)
    task = TASKS.get("classification")(data=str(tmp_path), img_size=32)
    train, val = task.datasets()
    assert task.label_names == ["cat", "dog"] and len(train) == len(val) == 8
    model = task.build_model(
        {
            "family": "timm",
            "name": "vit-custom",
            "img_size": 32,
            "patch_size": 8,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
        },
        MOE,
    )
    assert model.head.out_features == 2 and len(moe_layers(model)) == 2
    batch = next(iter(_loader(train, 8)))
    before, after = _one_step(task, model, batch)
    assert after < before
    metrics = task.evaluate(model.eval(), _loader(val, 4), torch.device("cpu"))
    assert set(metrics) >= {"top1", "top5", "loss"} and 0.0 <= metrics["top1"] <= 1.0
    assert metrics["top5"] == 1.0  # only 2 classes: the label is always in the top 5
    labels = task.token_labels(batch, "blocks.1.mlp", 17)
    assert labels.shape == (8, 17) and torch.equal(labels[:, 0], batch[1])


def test_classification_unknown_option_names_the_known_ones():
    with pytest.raises(TypeError, match="unknown option.*'img_szie'.*known options"):
        TASKS.get("classification")(img_szie=32)


# -- retrieval: COCO captions ------------------------------------------------------------------
def test_retrieval_on_a_four_image_coco_json(tmp_path):
    make_coco(tmp_path, "train")
    make_coco(tmp_path, "val")
    task = TASKS.get("retrieval")(data="coco", root=str(tmp_path))
    model_cfg = {
        "family": "open_clip",
        "name": "custom",
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    task._model_cfg = model_cfg  # transforms follow the model's image size
    train, val = task.datasets()
    assert len(train) == len(val) == 4 and len(val.all_texts()) == 21  # 6 + 5 + 5 + 5 captions
    model = task.build_model(model_cfg, MOE)
    assert {m.tower for m in moe_layers(model)} == {"visual", "text"}
    batch = next(iter(_loader(train, 4)))
    before, after = _one_step(task, model, batch)
    assert after < before
    metrics = task.evaluate(model.eval(), _loader(val, 4), torch.device("cpu"))
    assert {"i2t_r1", "t2i_r1", "i2t_r10", "mean_r1"} <= set(metrics)
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
    assert metrics["t2i_r5"] == 1.0  # only 4 images exist: every caption's image is in the top 5
    assert task.token_labels(batch, "transformer.resblocks.1.mlp", 77) is None


# -- brain age: BIDS ---------------------------------------------------------------------------
def test_brain_age_on_a_three_subject_bids_folder(tmp_path):
    root = make_bids(tmp_path / "bids")
    task = TASKS.get("brain-age")(data=str(root), shape=16, eval_fraction=0.34)
    train, val = task.datasets()
    assert len(train) + len(val) == 3 and len(val) == 1
    model = task.build_model(
        {"family": "vit3d", "img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, MOE
    )
    batch = next(iter(_loader(train, 2)))
    before, after = _one_step(task, model, batch)
    assert after < before
    metrics = task.evaluate(model.eval(), _loader(val, 1), torch.device("cpu"))
    age = float(val.ages[0])
    assert metrics["mae_predict_mean"] == pytest.approx(abs(age - float(train.ages.float().mean())), rel=1e-5)
    assert metrics["mae"] >= 0
    labels = task.token_labels(batch, "blocks.1.mlp", 1 + 8)
    assert labels.shape == (2, 9) and (labels[:, 0] == -1).all()
    with pytest.raises(ValueError, match="img_size 32 must equal task_args.shape 16"):
        task.build_model(
            {"family": "vit3d", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, None
        )
