"""The `random` control: a fresh uniform draw per token per forward, independent of content and position."""

import torch

from moebench.core.registry import ROUTERS
from moebench.core.routing import RoutingContext


def _first_choices(router, x):
    r = router(x, RoutingContext())
    return r.expert.view(x.shape[0], router.top_k)


def test_random_control_is_uniform_distinct_and_fresh_each_forward():
    router = ROUTERS.get("random")(16, 8, top_k=2, seed=3)
    x = torch.randn(8000, 16)
    a, b = _first_choices(router, x), _first_choices(router, x)
    assert (a[:, 0] != a[:, 1]).all()  # k distinct experts per token
    share = torch.bincount(a.reshape(-1), minlength=8).float() / a.numel()
    assert (share - 1 / 8).abs().max() < 0.02  # uniform load
    agree = (a[:, 0] == b[:, 0]).float().mean().item()
    assert abs(agree - 1 / 8) < 0.02  # the second forward is a new draw, not the same assignment
    assert int(router.calls) == 2


def test_random_control_ignores_content_and_replays_from_its_state():
    router = ROUTERS.get("random")(16, 8, top_k=1, seed=0)
    state = {k: v.clone() for k, v in router.state_dict().items()}
    first = _first_choices(router, torch.randn(500, 16))
    router.load_state_dict(state)  # as a resumed run restores the checkpointed counter
    again = _first_choices(router, torch.randn(500, 16) * 100)  # other content, same draw
    assert torch.equal(first, again)
    other_seed = ROUTERS.get("random")(16, 8, top_k=1, seed=1)
    assert not torch.equal(first, _first_choices(other_seed, torch.randn(500, 16)))
