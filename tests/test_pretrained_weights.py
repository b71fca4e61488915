"""Pretrained weights offline: a small timm model (a *named* timm architecture, shrunk) and a small
open_clip CLIP are trained a little, saved as state dicts, and loaded back through the real
``model.pretrained: /path`` code path (the tasks' build_model -> moebench.core.models), then upcycled:
the upcycled MoE model must compute what the loaded dense model computes. Nothing is downloaded.

The last test loads the same file into an adapter model with ``moe.freeze_backbone`` and checks that
training steps leave every loaded backbone weight exactly as the file has it."""

from __future__ import annotations

import logging

import pytest
import torch

from moebench.core.layer import moe_layers
from moebench.core.models import build_model
from moebench.core.registry import TASKS
from moebench.tasks.common import apply_moe

TIMM_NAMED = {
    "family": "timm",
    "name": "vit_tiny_patch16_224",
    "img_size": 28,
    "patch_size": 7,
    "in_chans": 1,
    "depth": 2,
    "num_classes": 10,
}
CLIP = {
    "family": "open_clip",
    "name": "custom",
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 2},
}
# routers whose upcycled layer is the dense MLP exactly: weights over the chosen identical experts sum to 1
EXACT = ["softmax-topk", "hash", "ermoe", "uniform", "loss-free"]


def _moe(router: str) -> dict:
    return {
        "blocks": "all",
        "num_experts": 4,
        "router": router,
        "router_args": {},
        "d_hidden": None,
        "capacity_factor": None,
        "upcycle": True,
    }


def _nudge(model: torch.nn.Module) -> None:
    """Stand-in for pretraining: weights a fresh build cannot have."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(TIMM_NAMED)
    _nudge(model)
    path = tmp_path_factory.mktemp("w") / "vit_tiny_small.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.mark.parametrize("router", EXACT)
def test_named_timm_weights_load_through_the_task_and_upcycle_exactly(timm_weights, router):
    dense, path = timm_weights
    task = TASKS.get("classification")()
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # another init than the saved model's: only the file can make them equal
    loaded = task.build_model({**TIMM_NAMED, "pretrained": str(path)}, None).eval()
    torch.manual_seed(321)
    moe = task.build_model({**TIMM_NAMED, "pretrained": str(path)}, _moe(router)).eval()
    assert len(moe_layers(moe)) == 2
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(loaded(x), want)
        torch.testing.assert_close(moe(x), want, atol=2e-5, rtol=1e-5)
        fresh = task.build_model(TIMM_NAMED, _moe(router)).eval()(x)
    assert (fresh - want).abs().max() > 1e-2


def test_a_router_that_scales_its_expert_changes_the_function(timm_weights):
    dense, path = timm_weights
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    moe = apply_moe(build_model({**TIMM_NAMED, "pretrained": str(path)}), _moe("switch")).eval()
    with torch.no_grad():  # Switch weights the expert by its raw probability (< 1): not the dense output
        assert (moe(x) - dense(x)).abs().max() > 1e-3


def test_open_clip_weights_load_from_a_file_and_upcycle_exactly(tmp_path):
    logging.disable(logging.WARNING)
    try:
        torch.manual_seed(0)
        dense = build_model(CLIP)
        _nudge(dense)
        path = tmp_path / "clip_small.bin"
        torch.save(dense.state_dict(), path)
        torch.manual_seed(7)
        moe = apply_moe(build_model({**CLIP, "pretrained": str(path)}), _moe("softmax-topk"))
    finally:
        logging.disable(logging.NOTSET)
    dense.eval()
    moe.eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    text = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    assert len(moe_layers(moe)) == 4  # both towers
    with torch.no_grad():
        torch.testing.assert_close(moe.encode_image(images), dense.encode_image(images), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(moe.encode_text(text), dense.encode_text(text), atol=2e-5, rtol=1e-5)


def test_a_checkpoint_of_another_architecture_is_refused_with_the_keys(timm_weights):
    _, path = timm_weights
    with pytest.raises(ValueError, match=r"does not match.*shape mismatches.*pretrained_strict: false"):
        build_model({**TIMM_NAMED, "depth": 2, "num_classes": 7, "pretrained": str(path)})


def test_loaded_backbone_stays_frozen_under_adapter_training(timm_weights):
    """pretrained: /path + moe.mode adapter + freeze_backbone: the loaded weights get no gradient and are
    unchanged after optimiser steps; only the adapters (and the head) move."""
    _, path = timm_weights
    saved = torch.load(path, weights_only=True)
    task = TASKS.get("classification")()
    moe = {
        "blocks": "last-1",
        "num_experts": 4,
        "router": "softmax-topk",
        "router_args": {"top_k": 1},
        "d_hidden": 8,
        "capacity_factor": None,
        "upcycle": False,
        "mode": "adapter",
        "patches_only": True,
        "freeze_backbone": True,
    }
    torch.manual_seed(7)
    net = task.build_model({**TIMM_NAMED, "pretrained": str(path)}, moe).train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    state = net.state_dict()
    backbone = [k for k in saved if not k.startswith("head.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)  # as loaded, after training
    frozen = dict(net.named_parameters())
    assert all(not frozen[k].requires_grad for k in backbone if k in frozen)
    assert any(not torch.equal(state[k], saved[k]) for k in saved if k.startswith("head."))  # the head trains
