"""The two grouped bias-add kernels (CPU in-place, accelerator gather + one-hot GEMM gradient) equal
the obvious ``h + bias[group]``, forward and backward, including empty groups."""

import pytest
import torch

from moebench.core.experts import _GatheredBiasAdd, _GroupedBiasAdd


@pytest.mark.parametrize("kind", ["grouped", "gathered"])
def test_group_bias_add_matches_indexing(kind):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    group = torch.repeat_interleave(torch.arange(4), counts)
    h = torch.randn(10, 6, requires_grad=True)
    bias = torch.randn(4, 6, requires_grad=True)
    ref_h, ref_b = h.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    if kind == "grouped":  # in place on a fresh tensor, as the experts use it
        out = _GroupedBiasAdd.apply(h * 1.0, bias, counts.tolist())
    else:
        out = _GatheredBiasAdd.apply(h, bias, group)
    ref = ref_h + ref_b[group]
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # the zero-stride gradient the grouped GEMM cannot take
    ref.sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad)
    torch.testing.assert_close(bias.grad, ref_b.grad)
    assert bias.grad[1].abs().sum() == 0  # the empty group gets no gradient
