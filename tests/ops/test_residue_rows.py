"""NSA's residue regrouping: the row-gather kernel (interpreter) against the strided-copy reference,
both directions, values and gradients (each direction's gradient is the other direction)."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops.residue_rows import _Regroup, from_residues_reference, to_residues_reference
from sparse_attn.ops.residue_rows import triton as kernel

CASES = [(32, 0, 16, 0, 16), (29, 3, 4, 1, 16), (1, 7, 8, 0, 64), (50, 1, 1, 2, 16), (77, 1, 16, 2, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq, front, stride, skip, dim", CASES, ids=str)
def test_kernel_equals_the_reference_both_ways_with_gradients(seq, front, stride, skip, dim, dtype, poison_outputs):
    rows = -(-(front + seq) // stride)
    skip = min(skip, rows - 1)
    x = torch.randn(2, 3, seq, dim).to(dtype)
    grouped = kernel.regroup_triton(x, to_residue=True, front=front, stride=stride, skip=skip, rows=rows)
    expected = to_residues_reference(x, front, rows, stride, skip)
    assert torch.equal(grouped, expected)
    back = kernel.regroup_triton(grouped, to_residue=False, front=front, stride=stride, skip=skip, rows=seq, fill=-7.0)
    assert torch.equal(back, from_residues_reference(grouped, front, seq, stride, skip, fill=-7.0))
    # Gradients through the autograd Function the dispatcher uses on CUDA, against the reference's.
    leaf = x.double().requires_grad_()
    options = dict(front=front, stride=stride, skip=skip, seq=seq, rows=rows)
    out = _Regroup.apply(leaf, kernel, True, options)
    weights = torch.randn_like(out)
    want = torch.autograd.grad((to_residues_reference(leaf, front, rows, stride, skip) * weights).sum(), leaf)[0]
    assert torch.equal(torch.autograd.grad((out * weights).sum(), leaf)[0], want)
    cells = grouped.double().requires_grad_()
    options = dict(front=front, stride=stride, skip=skip, seq=seq, rows=rows)
    out = _Regroup.apply(cells, kernel, False, options, 0.0)
    weights = torch.randn_like(out)
    reference = from_residues_reference(cells, front, seq, stride, skip)
    want = torch.autograd.grad((reference * weights).sum(), cells)[0]
    assert torch.equal(torch.autograd.grad((out * weights).sum(), cells)[0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq, front, stride, skip, dim", CASES[1:3], ids=str)
def test_kernel_adds_into_a_buffer(seq, front, stride, skip, dim, dtype, poison_outputs):
    """``add_to=``: the regrouped rows added into the buffer (float32 sum, rounded once), which is returned."""
    rows = -(-(front + seq) // stride)
    skip = min(skip, rows - 1)
    grouped = torch.randn(2 * stride, 3, rows - skip, dim).to(dtype)
    start = torch.randn(2, 3, seq, dim).to(dtype)
    into = start.clone()
    got = kernel.regroup_triton(grouped, to_residue=False, front=front, stride=stride, skip=skip, rows=seq, add_to=into)
    assert got is into
    want = start.float() + from_residues_reference(grouped, front, seq, stride, skip).float()
    tolerance = 0.0 if dtype == torch.float32 else 1e-2  # one rounding of the float32 sum to bf16
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)
    with pytest.raises(ValueError, match="add_to"):
        kernel.regroup_triton(grouped, to_residue=False, front=front, stride=stride, skip=skip, rows=seq,
                              add_to=start[..., :8])  # fmt: skip
