"""moefy and build_model on tiny timm / open_clip / vit3d models (CPU, a few seconds)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moebench import moe_layers
from moebench.core.experts import ACTIVATIONS
from moebench.core.layer import MoELayer
from moebench.core.models import ViT3D, build_model, count_params
from moebench.core.moefy import find_blocks, moefy, select_blocks
from moebench.core.registry import ROUTERS, register_router
from moebench.core.routing import Router, topk_routing

TIMM = {
    "family": "timm",
    "name": "vit-custom",
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 32,
    "depth": 4,
    "num_heads": 2,
    "num_classes": 5,
}
CLIP = {
    "family": "open_clip",
    "name": "custom",
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 3},
}
VIT3D = {
    "family": "vit3d",
    "img_size": 16,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "num_outputs": 2,
}


if "test-context-recorder" not in ROUTERS:

    @register_router("test-context-recorder", "test only: softmax top-2 that records what it was given")
    class ContextRecorder(Router):
        """Needs context; records the context, positions and token ids of every call."""

        needs_context = True

        def __init__(self, d_model, num_experts, top_k=2):
            super().__init__(d_model, num_experts, top_k)
            self.gate = nn.Linear(d_model, num_experts, bias=False)
            self.seen = []

        def forward(self, x, ctx):
            self.seen.append(
                {
                    "x": x.detach().clone(),
                    "context": ctx.context.detach().clone(),
                    "positions": ctx.positions.clone(),
                    "token_ids": None if ctx.token_ids is None else ctx.token_ids.clone(),
                }
            )
            probs = torch.softmax(self.gate(x), -1)
            p, i = probs.topk(self.top_k, -1)
            return topk_routing(i, p / p.sum(-1, keepdim=True), self.num_experts, stats={"scores": probs})


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _images(n=2, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _text(n=2, seed=2):
    return torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))


def _volumes(n=2, seed=3):
    return torch.randn(n, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run(family, model):
    if family == "open_clip":
        return torch.cat([model.encode_image(_images()), model.encode_text(_text())], 1)
    return model(_volumes() if family == "vit3d" else _images())


CFGS = {"timm": TIMM, "open_clip": CLIP, "vit3d": VIT3D}


# --- block selection --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("all", 4, [0, 1, 2, 3]),
        ("last-2", 4, [2, 3]),
        ("last-1", 4, [3]),
        ("first-3", 4, [0, 1, 2]),
        ("every-2", 4, [1, 3]),
        ("every-2", 5, [1, 3]),
        ("every-3", 7, [2, 5]),
        ("Last-4", 4, [0, 1, 2, 3]),
        ([0, -1, 3], 4, [0, 3]),
        ((2,), 4, [2]),
    ],
)
def test_select_blocks_forms(spec, n, expected):
    assert select_blocks(spec, n) == expected


@pytest.mark.parametrize(
    "spec", ["last-5", "every-5", "first-0", "middle", "last2", [], [4], [-5], [1.0], [True], 2, None]
)
def test_select_blocks_rejects_with_accepted_forms(spec):
    with pytest.raises(ValueError) as err:
        select_blocks(spec, 4)
    msg = str(err.value)
    assert "4 blocks" in msg and "last-N" in msg and "every-N" in msg and "list of block indices" in msg


@pytest.mark.parametrize(
    "spec, replaced",
    [
        ("last-2", [2, 3]),
        ("every-2", [1, 3]),
        ("all", [0, 1, 2, 3]),
        ([0, 2], [0, 2]),
        ("first-1", [0]),
    ],
)
def test_moefy_replaces_exactly_the_chosen_timm_blocks(spec, replaced):
    model = _model(TIMM)
    names = moefy(model, blocks=spec, num_experts=4)
    assert names == [f"blocks.{i}.mlp" for i in replaced]
    for i, block in enumerate(model.blocks):
        assert isinstance(block.mlp, MoELayer) == (i in replaced)
        if i in replaced:
            assert block.mlp.block_index == i and block.mlp.tower == "model"
    assert [n for n, m in model.named_modules() if isinstance(m, MoELayer)] == list(names)


def test_bad_blocks_spec_leaves_model_untouched():
    model = _model(TIMM)
    with pytest.raises(ValueError, match="4 blocks"):
        moefy(model, blocks="last-9")
    with pytest.raises(TypeError, match="router_args"):  # fails while building layers: still nothing replaced
        moefy(model, blocks="all", router_args={"nonsense": 1})
    assert not moe_layers(model)


def test_moefy_twice_and_bad_arguments_are_clear_errors():
    model = _model(TIMM)
    moefy(model, blocks="last-1", num_experts=2)
    with pytest.raises(ValueError, match="already a MoELayer"):
        moefy(model, blocks="last-1")
    with pytest.raises(ValueError, match="d_hidden"):
        moefy(_model(TIMM), d_hidden=0)
    with pytest.raises(ValueError, match="activation"):
        moefy(_model(TIMM), activation="tanhh")
    with pytest.raises(ValueError, match="tower"):
        moefy(_model(TIMM), tower="text")
    with pytest.raises(ValueError, match="no transformer blocks"):
        moefy(nn.Sequential(nn.Linear(2, 2)))


# --- upcycling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["timm", "open_clip", "vit3d"])
@pytest.mark.parametrize("router", ["softmax-topk", "uniform"])
def test_upcycled_model_equals_dense_model(family, router):
    """Every expert is the dense MLP and token-choice weights sum to 1, so outputs must not change."""
    model = _model(CFGS[family])
    with torch.no_grad():
        dense = _run(family, model)
        names = moefy(model, blocks="all", num_experts=4, router=router, router_args={"top_k": 2}, upcycle=True)
        assert names.notes == [] and len(names) == len(find_blocks(model))
        moe = _run(family, model)
        torch.testing.assert_close(moe, dense, atol=1e-5, rtol=1e-5)
        for layer in moe_layers(model):  # the experts are live: different experts, different output
            layer.experts.w1.add_(0.2 * torch.randn_like(layer.experts.w1))
        assert (_run(family, model) - dense).abs().max() > 1e-3


def test_upcycle_at_another_width_starts_fresh_and_says_so():
    model = _model(TIMM)
    with torch.no_grad():
        dense = model(_images())
        names = moefy(model, blocks="last-2", num_experts=4, d_hidden=48, upcycle=True)
        assert moe_layers(model)[0].experts.w1.shape == (4, 32, 48)
        assert len(names.notes) == 1 and "d_hidden=48" in names.notes[0] and "blocks.3.mlp" in names.notes[0]
        assert (model(_images()) - dense).abs().max() > 1e-3


def test_no_upcycle_differs_from_dense():
    model = _model(TIMM)
    with torch.no_grad():
        dense = model(_images())
        moefy(model, blocks="last-1", num_experts=4, upcycle=False)
        assert (model(_images()) - dense).abs().max() > 1e-3


def test_quick_gelu_is_mapped_or_noted():
    cfg = {**CLIP, "quick_gelu": True}
    names = moefy(_model(cfg), blocks="last-1", num_experts=2, upcycle=True)
    if "quick-gelu" in ACTIVATIONS:
        assert names.notes == []
    else:
        assert any("QuickGELU" in n for n in names.notes)


def test_moefied_model_trains():
    model = _model(TIMM).train()
    moefy(model, blocks="every-2", num_experts=4)
    model(_images()).sum().backward()
    layer = moe_layers(model)[0]
    assert layer.experts.w1.grad is not None and layer.router.gate.weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad is not None


# --- context and token ids ---------------------------------------------------------------------------
def _capture_block_inputs(blocks):
    seen = {}
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
    return seen


def test_context_is_the_blocks_attention_output_timm():
    model = _model(TIMM)
    inputs = _capture_block_inputs(model.blocks)
    moefy(model, blocks="every-2", num_experts=4, router="test-context-recorder")
    with torch.no_grad():
        model(_images())
        for i in (1, 3):
            block = model.blocks[i]
            assert block.mlp.pending_context is None  # consumed, not left for the next call
            expected = block.attn(block.norm1(inputs[i]))  # recomputed from the block's own input
            seen = block.mlp.router.seen
            assert len(seen) == 1
            torch.testing.assert_close(seen[0]["context"], expected.reshape(-1, 32))
            assert seen[0]["positions"].tolist() == list(range(17)) * 2  # (B, N, d): positions per image


def test_context_for_both_open_clip_towers_and_token_ids():
    model = _model(CLIP)
    vis_in = _capture_block_inputs(model.visual.transformer.resblocks)
    txt_in = _capture_block_inputs(model.transformer.resblocks)
    names = moefy(model, blocks="last-1", num_experts=4, router="test-context-recorder")
    assert names == ["visual.transformer.resblocks.1.mlp", "transformer.resblocks.2.mlp"]
    text = _text()
    with torch.no_grad():
        model.encode_image(_images())
        model.encode_text(text)
        for blocks, inputs, i in (
            (model.visual.transformer.resblocks, vis_in, 1),
            (model.transformer.resblocks, txt_in, 2),
        ):
            block = blocks[i]
            mask = model.attn_mask if blocks is model.transformer.resblocks else None
            expected = block.attention(block.ln_1(inputs[i]), attn_mask=mask)
            (seen,) = block.mlp.router.seen
            torch.testing.assert_close(seen["context"], expected.reshape(-1, 32))
    (txt_seen,) = model.transformer.resblocks[2].mlp.router.seen
    (vis_seen,) = model.visual.transformer.resblocks[1].mlp.router.seen
    assert torch.equal(txt_seen["token_ids"], text.reshape(-1))
    assert vis_seen["token_ids"] is None
    assert txt_seen["positions"].tolist() == list(range(8)) * 2


def test_seq_first_blocks_get_batch_first_positions_and_context():
    """open_clip with batch_first=False feeds (L, B, d) to the MLP; moefy transposes around the layer."""
    from open_clip.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(width=16, layers=2, heads=2, batch_first=False).eval()
    x = torch.randn(5, 3, 16)  # (L, B, d) as the model expects when batch_first=False
    with torch.no_grad():
        dense = model(x)  # Transformer.forward takes (B, L, d) and transposes itself
        inputs = _capture_block_inputs(model.resblocks)
        moefy(model, blocks="last-1", num_experts=4, router="test-context-recorder", upcycle=True)
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=1e-5)
        block = model.resblocks[1]
        (seen,) = block.mlp.router.seen
        assert inputs[1].shape == (3, 5, 16)  # blocks really run sequence-first
        expected = block.attention(block.ln_1(inputs[1])).transpose(0, 1)
        torch.testing.assert_close(seen["context"], expected.reshape(-1, 16))
        assert seen["positions"].tolist() == list(range(3)) * 5


def test_hooks_follow_a_deepcopy():
    model = _model(TIMM)
    moefy(model, blocks="last-1", num_experts=4, router="test-context-recorder")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin(_images())
    assert len(twin.blocks[3].mlp.router.seen) == 1
    assert model.blocks[3].mlp.router.seen == [] and model.blocks[3].mlp.pending_context is None


# --- open_clip towers --------------------------------------------------------------------------------
def test_open_clip_towers_selection_and_encoding():
    model = _model(CLIP)
    names = moefy(model, blocks="all", num_experts=4)  # includes text block 0 (open_clip reads its dtype)
    assert [n.rsplit(".", 2)[0] for n in names] == ["visual.transformer.resblocks"] * 2 + ["transformer.resblocks"] * 3
    assert {layer.tower for layer in moe_layers(model)} == {"visual", "text"}
    with torch.no_grad():
        assert model.encode_image(_images(3)).shape == (3, 16)
        assert model.encode_text(_text(3)).shape == (3, 16)
    only_text = _model(CLIP)
    assert moefy(only_text, blocks="every-2", tower="text") == ["transformer.resblocks.1.mlp"]
    only_vis = _model(CLIP)
    assert moefy(only_vis, blocks=[0], tower="visual") == ["visual.transformer.resblocks.0.mlp"]
    with pytest.raises(ValueError, match="visual tower with 2 blocks"):
        moefy(_model(CLIP), blocks=[2])  # index 2 exists in the text tower but not in the visual one


# --- models ------------------------------------------------------------------------------------------
def test_vit3d_forward_and_moefy():
    model = _model(VIT3D)
    assert isinstance(model, ViT3D) and model.num_patches == 8
    assert model(_volumes()).shape == (2, 2)
    assert moefy(model, blocks="every-2") == ["blocks.1.mlp"]
    assert model(_volumes()).shape == (2, 2)
    with pytest.raises(ValueError, match=r"expects input \(B, 1, 16, 16, 16\)"):
        model(torch.randn(2, 1, 8, 16, 16))


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match="'family' must be one of"):
        build_model({"family": "keras"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depht'\]"):
        build_model({**VIT3D, "depht": 2})
    with pytest.raises(ValueError, match="divisible"):
        build_model({**VIT3D, "patch_size": 5})
    with pytest.raises(ValueError, match=r"vision_cfg.*unknown field\(s\) \['widht'\]"):
        build_model({**CLIP, "vision_cfg": {"widht": 3}})
    with pytest.raises(ValueError, match="head_width"):
        build_model({**CLIP, "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "layers": 1}})
    with pytest.raises(TypeError, match="vit-custom"):
        build_model({**TIMM, "embed_dimm": 3})
    with pytest.raises(ValueError, match="unknown timm model"):
        build_model({"family": "timm", "name": "vit_does_not_exist"})
    with pytest.raises(ValueError, match="pretrained_strict"):
        build_model({**TIMM, "pretrained_strict": "yes"})


@pytest.mark.parametrize(
    "family, wrap",
    [
        ("timm", "plain"),
        ("open_clip", "plain"),
        ("vit3d", "plain"),
        ("vit3d", "state_dict"),
        ("vit3d", "model"),
        ("timm", "module-prefix"),
    ],
)
def test_pretrained_path_round_trip(tmp_path, family, wrap):
    source = _model(CFGS[family], seed=0)
    state = source.state_dict()
    obj = {
        "plain": state,
        "state_dict": {"state_dict": state, "step": 3},
        "model": {"model": state},
        "module-prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "weights.pt"
    torch.save(obj, path)
    loaded = _model({**CFGS[family], "pretrained": str(path)}, seed=1)
    fresh = _model(CFGS[family], seed=1)
    with torch.no_grad():
        torch.testing.assert_close(_run(family, loaded), _run(family, source))
        assert (_run(family, fresh) - _run(family, source)).abs().max() > 1e-4  # seed 1 alone would differ


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "deeper.pt"
    torch.save(_model({**TIMM, "depth": 5}).state_dict(), path)
    with pytest.raises(ValueError) as err:
        build_model({**TIMM, "pretrained": str(path)})
    msg = str(err.value)
    assert "unexpected keys" in msg and "blocks.4.mlp.fc1.weight" in msg and "pretrained_strict" in msg
    other = tmp_path / "head.pt"
    torch.save(_model({**TIMM, "num_classes": 7}).state_dict(), other)
    with pytest.raises(ValueError, match=r"head.weight \(7, 32\) vs model \(5, 32\)"):
        build_model({**TIMM, "pretrained": str(other)})
    with pytest.warns(UserWarning, match="head.weight"):  # non-strict: loads the backbone, skips the head
        model = build_model({**TIMM, "pretrained": str(other), "pretrained_strict": False})
    src = torch.load(other)
    assert torch.equal(model.state_dict()["blocks.0.mlp.fc1.weight"], src["blocks.0.mlp.fc1.weight"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model({**VIT3D, "pretrained": str(tmp_path / "missing.pt")})
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="no state dict"):
        build_model({**VIT3D, "pretrained": str(junk)})


def test_hub_failure_says_how_to_use_a_local_file(monkeypatch):
    import open_clip
    import timm

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="pretrained: /path/to/file"):
        build_model({"family": "timm", "name": "vit_tiny_patch16_224", "pretrained": True})
    monkeypatch.setattr(
        open_clip,
        "create_model",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("Failed to download weights for tag 'openai'")),
    )
    with pytest.raises(RuntimeError, match="machine with network access"):
        build_model({"family": "open_clip", "name": "ViT-B-32", "pretrained": "openai"})
    with pytest.raises(ValueError, match="no hub weights"):
        build_model({**VIT3D, "pretrained": True})


def test_count_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    assert count_params(model) == 12 + 4 + 8 + 2
    assert count_params(model, trainable_only=True) == 12 + 4 + 2
    vit = _model(VIT3D)
    before = count_params(vit)
    moefy(vit, blocks="last-1", num_experts=4)
    mlp = 2 * 32 * 128 + 128 + 32
    assert count_params(vit) - before == 3 * mlp + 32 * 4  # 3 more experts plus the gate
