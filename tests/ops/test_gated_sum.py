"""NSA's gated sum: the one-pass kernel (interpreter) against the PyTorch reference, the dispatch
rule (gradients take the reference) and the input checks."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops.gated_sum import gated_sum, gated_sum_reference
from sparse_attn.ops.gated_sum import triton as kernel


def _inputs(batch, heads, seq, dim, dtype, branches, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=generator).to(dtype)
    outs = [torch.randn(batch, heads, seq, dim, generator=generator).to(dtype) for _ in range(branches)]
    weight = torch.randn(heads, dim, 3, generator=generator) * dim**-0.5
    bias = torch.randn(heads, 3, generator=generator)
    return q, outs, weight, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, branches", [((2, 3, 77, 16), 3), ((1, 4, 130, 64), 2), ((1, 2, 33, 256), 3)], ids=str)
def test_kernel_matches_the_reference(shape, branches, dtype, poison_outputs):
    q, outs, weight, bias = _inputs(*shape, dtype, branches, seed=shape[2])
    got = kernel.gated_sum_triton(q, tuple(outs), weight, bias)
    want = gated_sum_reference(q.double(), tuple(x.double() for x in outs), weight.double(), bias.double())
    # The reference rounds the gate product to q's dtype; in float64 it does not: allow that rounding.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got, gated_sum_reference(q, tuple(outs), weight, bias), rtol=tolerance, atol=tolerance)


def test_strided_inputs_and_bf16_parameters(poison_outputs):
    """Branches in (B, S, H, D) storage, q sliced, parameters in bf16 (a model cast to bf16)."""
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(2, 40, 6, 32, generator=generator).to(torch.bfloat16).transpose(1, 2)
    outs = tuple(torch.randn(2, 40, 6, 32, generator=generator).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    weight = (torch.randn(6, 32, 3, generator=generator) * 0.2).to(torch.bfloat16)
    bias = torch.randn(6, 3, generator=generator).to(torch.bfloat16)
    got = kernel.gated_sum_triton(q, outs, weight, bias)
    torch.testing.assert_close(got, gated_sum_reference(q, outs, weight, bias), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, branches", [((2, 3, 77, 16), 3), ((1, 4, 70, 64), 2), ((1, 2, 33, 256), 3)], ids=str)
def test_kernel_gradients_match_the_reference(shape, branches, dtype, poison_outputs):
    """The backward kernel (through the autograd Function the dispatcher uses on CUDA) against the
    float64 reference's autograd: q, every branch, the weight and the bias."""
    from sparse_attn.ops.gated_sum import _GatedSum

    q, outs, weight, bias = _inputs(*shape, dtype, branches, seed=shape[2] + 1)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (q, weight, bias, *outs)]
    got = torch.autograd.grad(_GatedSum.apply(kernel, *leaves), leaves, grad)
    exact = [x.detach().double().requires_grad_() for x in leaves]
    out = gated_sum_reference(exact[0], tuple(exact[3:]), exact[1], exact[2])
    want = torch.autograd.grad(out, exact, grad.double())
    # bf16: the weight's gradient sums 16-bit products over B x S rows (as the reference's autograd does).
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for name, g, w in zip(["q", "weight", "bias", "a", "b", "c"], got, want, strict=False):
        scale = w.abs().max().item() or 1.0
        torch.testing.assert_close(g.double() / scale, w / scale, rtol=tolerance, atol=tolerance, msg=name)


def test_gradients_take_the_differentiable_reference():
    q, outs, weight, bias = _inputs(1, 2, 9, 8, torch.float64, 3, seed=1)
    weight.requires_grad_()
    out = gated_sum(q, outs, weight, bias)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(branches=[]), TypeError, "two or three"),
        (dict(branches=[torch.zeros(1, 2, 8, 8)] * 2), ValueError, r"branches\[0\] must have q's shape"),
        (dict(weight=torch.zeros(2, 8, 1)), ValueError, "weight must be a float tensor"),
        (dict(bias=torch.zeros(2, 4)), ValueError, "as many gates"),
        (dict(bias=None), TypeError, "bias must be a torch.Tensor"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs_are_named(change, error, match):
    q, outs, weight, bias = _inputs(1, 2, 9, 8, torch.float32, 3, seed=0)
    arguments = {**dict(q=q, branches=outs, weight=weight, bias=bias), **change}
    with pytest.raises(error, match=match):
        gated_sum(**arguments)


@pytest.mark.gpu
def test_gpu_kernel_matches_the_reference_at_nsa_size():
    q, outs, weight, bias = _inputs(1, 64, 8192, 128, torch.bfloat16, 3, seed=2)
    q, outs, weight, bias = q.cuda(), [x.cuda() for x in outs], weight.cuda(), bias.cuda()
    got = gated_sum(q, outs, weight, bias)
    torch.testing.assert_close(got, gated_sum_reference(q, tuple(outs), weight, bias), rtol=2e-2, atol=2e-2)
    leaves = [x.clone().requires_grad_() for x in (q, weight, bias, *outs)]
    grad = torch.randn_like(q)
    got = torch.autograd.grad(gated_sum(leaves[0], leaves[3:], leaves[1], leaves[2]), leaves, grad)
    exact = [x.detach().double().requires_grad_() for x in leaves]
    want = torch.autograd.grad(
        gated_sum_reference(exact[0], tuple(exact[3:]), exact[1], exact[2]), exact, grad.double()
    )
    for name, g, w in zip(["q", "weight", "bias", "a", "b", "c"], got, want, strict=True):
        scale = w.abs().max().item() or 1.0
        torch.testing.assert_close(g.double() / scale, w / scale, rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, branches", [((2, 3, 77, 16), 3), ((1, 4, 70, 64), 2)], ids=str)
def test_folded_backward_gives_row_dots_and_log_gates(shape, branches, dtype, poison_outputs):
    """``folded=True`` (the fused NSA backward, nn.nsa_fused): per branch the float32
    ``rowsum(dO * branch_b)`` and ``log g_b`` against float64, q's / the weight's / the bias's
    gradients bit for bit those of the plain call."""
    q, outs, weight, bias = _inputs(*shape, dtype, branches, seed=shape[2] + 5)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    dq, _, d_weight, d_bias = kernel.gated_sum_backward_triton(q, tuple(outs), weight, bias, grad)
    got = kernel.gated_sum_backward_triton(q, tuple(outs), weight, bias, grad, folded=True)
    for value, want in zip(got[:3], (dq, d_weight, d_bias), strict=True):
        torch.testing.assert_close(value, want, rtol=0, atol=0)
    dots, log_gates = got[3:]
    logits = torch.einsum("bhsd,hdg->bhsg", q.double(), weight.double()) + bias.double()[:, None]
    assert len(dots) == len(log_gates) == branches
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # bf16: the gate's product rounded to bf16
    for index, out in enumerate(outs):
        want_dot = (grad.double() * out.double()).sum(-1)
        want_log = torch.nn.functional.logsigmoid(logits[..., index])
        for value, want in ((dots[index], want_dot), (log_gates[index], want_log)):
            assert value.dtype == torch.float32 and value.shape == q.shape[:3]
            torch.testing.assert_close(value.double(), want, rtol=tolerance, atol=tolerance * want.abs().max().item())
