"""EMoE router: equal to an independent transcription of the authors' formulas; Q stays orthonormal
under training; bad options are refused with the reason."""

from __future__ import annotations

import pytest
import torch

from moebench.core.layer import MoELayer
from moebench.core.routing import RoutingContext

D, E, R = 32, 6, 12


def transcription(h, Q, gamma, M, b, tau=1.0):
    """The formulas of docs/ERMOE.md, written out term by term (slow loops, no shared helpers)."""
    T = h.shape[0]
    out = torch.empty(T, M.shape[0])
    w = torch.exp(M) / torch.exp(M).sum(0, keepdim=True)  # softmax over experts, per direction
    for t in range(T):
        proj = torch.stack([torch.dot(Q[:, j], h[t]) for j in range(Q.shape[1])])
        e = proj**2
        e = e / (e.sum() + 1e-6)
        logits = torch.stack(
            [sum(e[j] * gamma[j] * w[i, j] for j in range(Q.shape[1])) + b[i] for i in range(M.shape[0])]
        )
        out[t] = torch.exp(logits / tau) / torch.exp(logits / tau).sum()
    return out


def _router(**kw):
    torch.manual_seed(0)
    layer = MoELayer(D, 16, E, router="emoe", router_args={"rank": R, **kw})
    r = layer.router
    with torch.no_grad():  # move gamma and b off their inits so every term is exercised
        r.gamma.uniform_(0.5, 1.5)
        r.b.normal_()
    return layer, r


@pytest.mark.parametrize("mode,k", [("top1", 1), ("top2", 2), ("soft", E)])
def test_emoe_matches_transcription(mode, k):
    layer, r = _router(mode=mode, tau=0.7)
    x = torch.randn(10, D)
    routing = r(x, RoutingContext(training=False))
    p = transcription(x, r.Q.detach(), r.gamma.detach(), r.M.detach(), r.b.detach(), tau=0.7)
    torch.testing.assert_close(routing.stats["scores"], p, rtol=1e-5, atol=1e-6)
    # the weights are the k largest probabilities themselves, not renormalised over the k
    got = torch.zeros(10, E).index_put_((routing.token, routing.expert), routing.weight.detach())
    top_p, top_i = p.topk(k, dim=-1)
    want = torch.zeros(10, E).scatter_(1, top_i, top_p)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if mode != "soft":
        assert (routing.weight.view(10, k).sum(-1) < 1 - 1e-3).all()
    q = r.Q.detach()
    torch.testing.assert_close(
        routing.aux_losses["orth"], 1e-3 * ((q.T @ q - torch.eye(R)) ** 2).sum(), rtol=1e-5, atol=1e-9
    )


def test_emoe_defaults_are_the_authors():
    torch.manual_seed(0)
    layer = MoELayer(256, 16, 8, router="emoe")
    r = layer.router
    assert (r.rank, r.mode, r.top_k, r.tau, r.lambda_orth) == (128, "top1", 1, 1.0, 1e-3)
    assert torch.equal(r.gamma, torch.ones(128)) and torch.equal(r.b, torch.zeros(8))
    assert (r.Q.T @ r.Q - torch.eye(128)).abs().max() < 1e-5


def test_retraction_keeps_q_orthonormal_while_training():
    layer, r = _router(lambda_orth=0.0)  # no penalty: only the retraction keeps Q orthonormal
    opt = torch.optim.SGD(layer.parameters(), lr=50.0)
    x = torch.randn(4, 8, D)
    layer.train()
    moved = 0.0
    for _ in range(20):
        loss = layer(x).square().mean() + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        moved = max(moved, float((r.Q.detach().T @ r.Q.detach() - torch.eye(R)).abs().max()))
        layer(x)  # the next training forward retracts
        assert (r.Q.T @ r.Q - torch.eye(R)).abs().max() < 1e-5
    assert moved > 1e-4  # the steps did move Q off the manifold, so the retraction had work to do


@pytest.mark.parametrize(
    "args,msg",
    [
        ({"rank": D}, r"rank=32 must be below d_model=32"),
        ({"rank": 40}, r"rank=40 must be below d_model=32"),
        ({"rank": 4, "mode": "top3"}, r"args.mode: expected one of soft, top1, top2, got 'top3'"),
        ({"rank": 4, "tau": 0}, r"args.tau: expected a finite number > 0, got 0"),
    ],
)
def test_emoe_refuses_bad_options(args, msg):
    with pytest.raises(ValueError, match=msg):
        MoELayer(D, 16, E, router="emoe", router_args=args)
