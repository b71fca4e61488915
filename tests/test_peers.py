"""Equality with the public implementations in `transformers` (the `peers` extra), on copied weights:
Mixtral's sparse MoE block (softmax top-k + SwiGLU experts), Qwen2-MoE's block (+ a gated shared expert),
DeepSeek-V3's router and MoE block (group-limited sigmoid top-k, scaled weights, shared experts).
Skipped, with the reason, when `transformers` is not installed (`pip install -e .[peers]`)."""

from __future__ import annotations

import pytest
import torch

from moebench.core.layer import MoELayer

try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip(
        "transformers is not installed: these equality tests need the `peers` extra (pip install -e .[peers])",
        allow_module_level=True,
    )

D, H, E = 16, 32, 8


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _copy_gated_experts(experts, theirs):
    """transformers' (E, 2I, d) [gate; up] and (E, d, I) in nn.Linear layout -> moebench's (E, d, 2I) / (E, I, d).
    transformers < 5 keeps one module per expert (Mixtral: w1 gate, w3 up, w2 down; others gate/up/down_proj)."""
    if hasattr(theirs, "gate_up_proj"):
        gate_up_proj, down_proj = theirs.gate_up_proj, theirs.down_proj
    else:
        names = ("w1", "w3", "w2") if hasattr(theirs[0], "w1") else ("gate_proj", "up_proj", "down_proj")
        gate, up, down = ([getattr(m, n).weight for m in theirs] for n in names)
        gate_up_proj = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        down_proj = torch.stack(down)
    with torch.no_grad():
        experts.w1.copy_(gate_up_proj.transpose(1, 2))
        experts.w2.copy_(down_proj.transpose(1, 2))
        experts.b1.zero_()
        experts.b2.zero_()


def _copy_mlp(shared, mlp):
    """A transformers gate_proj / up_proj / down_proj MLP -> moebench's shared experts (one gated expert)."""
    with torch.no_grad():
        shared.mlp.w1[0].copy_(torch.cat([mlp.gate_proj.weight.t(), mlp.up_proj.weight.t()], dim=1))
        shared.mlp.w2[0].copy_(mlp.down_proj.weight.t())
        shared.mlp.b1.zero_()
        shared.mlp.b2.zero_()


def _inputs(seed=1):
    return torch.randn(2, 10, D, generator=torch.Generator().manual_seed(seed))


def test_softmax_topk_swiglu_equals_mixtral_block():
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=D,
        intermediate_size=H,
        num_local_experts=E,
        num_experts_per_tok=2,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    block = _randomise(MixtralSparseMoeBlock(cfg)).eval()
    layer = MoELayer(D, H, E, router="softmax-topk", router_args={"top_k": 2}, activation="swiglu").eval()
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.gate.weight)
    _copy_gated_experts(layer.experts, block.experts)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x.clone()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [True, False], ids=["renormalised", "raw"])
def test_softmax_topk_shared_gated_equals_qwen2_moe_block(norm_topk_prob):
    """norm_topk_prob=False: the raw top-k softmax probabilities (Qwen2-MoE's default, Qwen1.5-MoE)."""
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=H,
        shared_expert_intermediate_size=2 * H,
        num_experts=E,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        hidden_act="silu",
    )
    block = _randomise(Qwen2MoeSparseMoeBlock(cfg)).eval()
    layer = MoELayer(
        D,
        H,
        E,
        router="softmax-topk",
        router_args={"top_k": 2, "norm_topk_prob": norm_topk_prob},
        activation="swiglu",
        shared_experts=2,
        shared_expert_gate=True,
    ).eval()
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.gate.weight)
        layer.shared.gate.weight.copy_(block.shared_expert_gate.weight)
    _copy_gated_experts(layer.experts, block.experts)
    _copy_mlp(layer.shared, block.shared_expert)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-5)


def _deepseek_config(**kw):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config

    args = dict(
        hidden_size=D,
        moe_intermediate_size=H,
        n_routed_experts=E,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        n_shared_experts=1,
        hidden_act="silu",
    )
    return DeepseekV3Config(**{**args, **kw})


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_deepseek_v3_router_equals_transformers(with_bias):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    ref = _randomise(DeepseekV3TopkRouter(_deepseek_config()))
    router = MoELayer(
        D, H, E, router="deepseek-v3", router_args={"num_groups": 4, "group_top_k": 2, "scaling": 2.5}
    ).router.eval()
    with torch.no_grad():
        router.gate.weight.copy_(ref.weight)
        if with_bias:
            bias = torch.randn(E, generator=torch.Generator().manual_seed(3)) * 0.5
            ref.e_score_correction_bias.copy_(bias)
            router.expert_bias.copy_(bias)
    x = _inputs().reshape(-1, D)
    from moebench.core.routing import RoutingContext

    routing = router(x, RoutingContext())
    out = ref(x)  # transformers 5: (logits, weights, indices); 4.x: (indices, weights)
    ref_w, ref_i = (out[1], out[2]) if len(out) == 3 else (out[1], out[0])
    ours = torch.zeros(x.shape[0], E).index_put_((routing.token, routing.expert), routing.weight)
    theirs = torch.zeros(x.shape[0], E).scatter_(1, ref_i, ref_w)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_deepseek_v3_layer_equals_transformers_moe_block():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    block = _randomise(DeepseekV3MoE(_deepseek_config())).eval()
    layer = MoELayer(
        D,
        H,
        E,
        router="deepseek-v3",
        router_args={"num_groups": 4, "group_top_k": 2, "scaling": 2.5},
        activation="swiglu",
        shared_experts=1,
    ).eval()
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.gate.weight)
        layer.router.expert_bias.copy_(block.gate.e_score_correction_bias)
    _copy_gated_experts(layer.experts, block.experts)
    _copy_mlp(layer.shared, block.shared_experts)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-5)
