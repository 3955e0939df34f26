"""Row gather (the layout permutation's copy): the Triton kernel (interpreter) against ``index_select``
on permutations, shorter outputs and strided inputs; the layouts use it; bad input; GPU."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.layouts import Layout
from sparse_attn.ops.row_gather import gather_rows
from sparse_attn.ops.row_gather.triton import gather_rows as gather_rows_triton
from sparse_attn.ops.row_gather.triton import unsupported_reason


@pytest.mark.parametrize(
    "shape, dtype, out_len, strided",
    [
        ((2, 3, 70, 64), torch.float32, 70, False),
        ((1, 5, 45, 80), torch.bfloat16, 45, True),  # D not a power of two; (B, S, H, D) storage
        ((2, 2, 33, 128), torch.float16, 17, False),  # fewer rows out than in, repeated indices
        ((2, 3, 70, 1), torch.float32, 70, True),  # a (B, H, S) log-sum-exp as rows of one element
    ],
    ids=str,
)
def test_kernel_equals_index_select(shape, dtype, out_len, strided):
    generator = torch.Generator().manual_seed(sum(shape))
    batch, heads, seq, dim = shape
    if strided:
        x = torch.randn(batch, seq, heads, dim, generator=generator).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(shape, generator=generator).to(dtype)
    index = torch.randperm(seq, generator=generator)[:out_len]
    if out_len < seq:
        index[-1] = index[0]
    assert unsupported_reason(x, index=index) is None
    got = gather_rows_triton(x, index)
    assert got.is_contiguous() and torch.equal(got, x.index_select(2, index))


def test_kernel_path_is_differentiable(monkeypatch):
    from sparse_attn.ops import row_gather
    from sparse_attn.ops.row_gather import triton as kernel_module

    monkeypatch.setattr(row_gather, "kernel_for", lambda x, package, **case: kernel_module)  # the CUDA path, on CPU
    x = torch.randn(2, 3, 21, 64, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 20, 4, 7, 7, 7, 1])
    grad = torch.randn(2, 3, 8, 64, dtype=torch.float64)
    got = gather_rows(x, index)
    assert got.grad_fn is not None
    (got_grad,) = torch.autograd.grad(got, x, grad)
    (want_grad,) = torch.autograd.grad(x.index_select(2, index), x, grad)
    assert torch.equal(got.detach(), x.detach().index_select(2, index)) and torch.equal(got_grad, want_grad)


def test_layout_permutation_round_trips_through_the_operator():
    layout = Layout((3, 10, 12), tile=(2, 4, 8), text_tokens=4)
    x = torch.randn(2, 3, layout.seq_len, 16)
    assert torch.equal(layout.unpermute(layout.permute(x)), x)
    assert torch.equal(gather_rows(x, layout.order()), x.index_select(2, layout.order()))
    lse = torch.randn(2, 3, layout.seq_len)  # (B, H, S): rows of one element
    assert torch.equal(layout.unpermute(layout.permute(lse)), lse)


def test_three_dimensional_tensors_take_the_kernel_as_rows_of_one_element(monkeypatch):
    """A ``(B, H, S)`` log-sum-exp (the un-permuted LSE of a spatial call) goes through the kernel,
    not the reference with a warning, forward and backward."""
    from sparse_attn.ops import row_gather
    from sparse_attn.ops.row_gather import triton as kernel_module

    seen = []

    def kernel_for(x, package, **case):
        seen.append(tuple(x.shape))
        return kernel_module

    monkeypatch.setattr(row_gather, "kernel_for", kernel_for)  # the CUDA path, on CPU
    lse = torch.randn(2, 3, 40, dtype=torch.float64).transpose(0, 1).contiguous().transpose(0, 1)
    lse.requires_grad_()
    index = torch.randperm(40)
    got = gather_rows(lse, index)
    assert seen == [(2, 3, 40, 1)] and got.shape == (2, 3, 40)
    grad = torch.randn(2, 3, 40, dtype=torch.float64)
    (got_grad,) = torch.autograd.grad(got, lse, grad)
    (want_grad,) = torch.autograd.grad(lse.index_select(2, index), lse, grad)
    assert torch.equal(got.detach(), lse.detach().index_select(2, index)) and torch.equal(got_grad, want_grad)


def test_bad_input():
    with pytest.raises(ValueError, match="index must be a 1D int64"):
        gather_rows(torch.zeros(1, 1, 4, 2), torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        gather_rows(torch.zeros(4, 2), torch.arange(4))
    assert "2- or 4-byte" in unsupported_reason(torch.zeros(1, 1, 4, 2, dtype=torch.float64), index=torch.arange(4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_gather_at_video_size(dtype):
    layout = Layout((30, 48, 80), tile=(6, 8, 8), text_tokens=256)
    x = torch.randn(1, 24, layout.seq_len, 128, device="cuda", dtype=dtype)
    order = layout.order(x.device)
    assert torch.equal(gather_rows(x, order), x.index_select(2, order))
    assert torch.equal(layout.unpermute(layout.permute(x)), x)
