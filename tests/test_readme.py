"""The README's examples are real code: the router example registers, routes and matches the reference MoE;
the Python API examples moefy a timm ViT and an open_clip CLIP, train, and read routing statistics."""

import re
from pathlib import Path

import pytest
import torch
from reference_moe import recorded_routing, reference_forward

from moebench.core.layer import MoELayer
from moebench.core.registry import ROUTERS

README = Path(__file__).resolve().parent.parent / "README.md"


def _router_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = [b for b in blocks if "@register_router" in b]
    assert example, "README lost its router example"
    return example[0]


def test_readme_router_example_registers_and_routes():
    code = _router_example()
    assert len(code.strip().splitlines()) <= 36  # "a 20-line example", give or take imports and its options
    namespace: dict = {}
    if "cosine-topk" not in ROUTERS:
        exec(compile(code, "README.md", "exec"), namespace)
    assert "cosine-topk" in ROUTERS.names()
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router="cosine-topk", router_args={"top_k": 2})
    x = torch.randn(2, 6, 16)
    with recorded_routing(layer) as routings:
        y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, reference_forward(layer, x, routings[0]))
    counts = layer.stats["counts"]
    assert int(counts.sum()) == 2 * 6 * 2  # every token reached exactly k experts
    # the routing respects the formula: chosen experts are the top-2 cosine scores
    scores = layer.stats["scores"]
    emb = layer.router.emb.detach()
    cos = torch.nn.functional.normalize(x.reshape(-1, 16), dim=-1) @ torch.nn.functional.normalize(emb, dim=-1).T
    assert torch.equal(scores.argmax(-1), cos.argmax(-1))


def _readme_router():
    if "cosine-topk" not in ROUTERS:
        exec(compile(_router_example(), "README.md", "exec"), {})
    return ROUTERS.get("cosine-topk")


def test_readme_router_declares_its_options_and_checks_none_by_hand():
    """Issue 22: a new router with typed options needs no hand-written validation. The README's router
    declares `options`; a bad value is refused before its __init__ runs, worded like a grid file's
    error about a bad key's value: `<where>: <key path>: expected <what>, got <value> (<type>)`."""
    from moebench.grids.schema import GridError, load

    code = _router_example()
    assert "options = {" in code and "raise" not in code  # declared, not checked by hand
    cls = _readme_router()
    assert set(cls.options) == {"top_k", "tau"}
    cls(16, 4)  # the declared defaults are accepted
    with pytest.raises(ValueError) as in_python:
        cls(16, 4, tau=0)
    with pytest.raises(ValueError) as in_a_layer:
        MoELayer(16, 32, 4, router="cosine-topk", router_args={"tau": 0})
    with pytest.raises(GridError) as in_a_grid:
        load({"task": "toy", "routers": [{"name": "cosine-topk", "args": {"tau": 0}}]}, file="g.yaml")
    with pytest.raises(GridError) as bad_grid_key:
        load({"task": "toy", "routers": ["dense"], "train": {"lr": 0}}, file="g.yaml")
    assert str(in_python.value) == "router 'cosine-topk': args.tau: expected a number > 0, got 0 (int)"
    assert str(in_a_layer.value) == str(in_python.value)
    assert str(in_a_grid.value) == "g.yaml: routers[0].args.tau: expected a number > 0, got 0 (int)"
    assert str(bad_grid_key.value) == "g.yaml: train.lr: expected a number > 0, got 0 (int)"
    shape = re.compile(
        r"^(?P<where>[^:]+): (?P<key>[\w.\[\]]+): expected (?P<what>.+), got (?P<value>.+) \((?P<type>\w+)\)$"
    )
    parts = [shape.match(str(e.value)) for e in (in_python, in_a_grid, bad_grid_key)]
    assert all(parts), [str(e.value) for e in (in_python, in_a_grid, bad_grid_key)]
    assert {m["what"] for m in parts} == {"a number > 0"} and {m["key"].split(".")[-1] for m in parts[:2]} == {"tau"}
    with pytest.raises(ValueError, match=r"args.top_k: expected an integer >= 1, got 0 \(int\)"):
        cls(16, 4, top_k=0)


def _api_examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if "moebench.moefy(" in b]
    assert len(found) == 2, "README lost its Python API examples (a timm ViT and an open_clip CLIP)"
    return found


def _run(code: str) -> dict:
    namespace: dict = {"__name__": "readme_example"}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_readme_python_api_on_a_timm_vit(one_thread):
    import moebench
    from moebench.training.metrics import load_cv

    ns = _run(_api_examples()[0])
    model, stats = ns["model"], ns["stats"]
    assert list(ns["names"]) == ["blocks.2.mlp", "blocks.3.mlp"]
    layers = moebench.moe_layers(model)
    assert [type(m.router).__name__ for m in layers] == ["SoftmaxTopK"] * 2 and model.training
    assert [d["layer"] for d in stats["per_layer"]] == list(ns["names"])
    for d in stats["per_layer"]:
        assert sum(d["counts"]) == 64 * 17 * 2  # 64 images x (16 patches + cls) x top-2
        assert d["load_cv"] == pytest.approx(load_cv(d["counts"]))
        assert d["mutual_info"] is None and d["unrouted_rate"] == 0.0
    assert stats["mean"]["load_cv"] == pytest.approx(sum(d["load_cv"] for d in stats["per_layer"]) / 2)
    assert ns["loss"].isfinite()
    latest = moebench.routing_stats(model)  # the last forward: the second half of the images
    assert [sum(d["counts"]) for d in latest["per_layer"]] == [32 * 17 * 2] * 2


def test_readme_python_api_on_an_open_clip_model(one_thread):
    import moebench

    ns = _run(_api_examples()[1])
    clip, stats = ns["clip"], ns["stats"]
    layers = moebench.moe_layers(clip)
    assert len(layers) == 1 and layers[0].router_name == "ermoe"  # only the visual tower's last block
    (d,) = stats["per_layer"]
    assert d["layer"] == "visual.transformer.resblocks.1.mlp"
    assert sum(d["counts"]) == 8 * 17 * 2 and d["dead_experts"] is not None
    assert ns["image"].shape == (8, 32) and ns["text"].shape == (8, 32)
