"""NSA's gated sum of its branches: ``out = sum_b sigmoid(q . W[:, :, b] + bias[:, b]) * branch_b``.

Paper: Jingyang Yuan, Huazuo Gao, Damai Dai, et al., "Native Sparse Attention: Hardware-Aligned
and Natively Trainable Sparse Attention", 2025, arXiv:2502.11089, Section 3 (the branches'
outputs combined by gates in (0, 1)). The gates here are :mod:`sparse_attn.nn.nsa`'s choice: per
query head, from the query (the paper computes them from the input features with an MLP).

Reference: :mod:`.naive` (PyTorch; differentiable). Kernels: :mod:`.triton` (one pass forward;
one pass backward for the branches', q's and the gate logits' gradients, then the weight's and
bias's as reductions), chosen on CUDA when its ``unsupported_reason`` is ``None`` (the rule of
:mod:`sparse_attn.ops._dispatch`), differentiable in every input through
:class:`_GatedSum`.
"""

from __future__ import annotations

import torch

from ...checks import check_tensor
from .._dispatch import kernel_for
from .naive import gated_sum_reference

__all__ = ["gated_sum", "gated_sum_reference"]


def gated_sum(
    q: torch.Tensor, branches: tuple[torch.Tensor, ...] | list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``(B, H, S, D)`` in q's dtype: the branches ``(B, H, S, D)`` (two or three, any float dtype)
    weighted by their gates ``sigmoid(q . weight[h, :, b] + bias[h, b])`` and summed.

    q ``(B, H, S, D)``; weight ``(H, D, G)`` and bias ``(H, G)`` with ``G >= len(branches)``
    gates per head (branch ``b`` uses gate ``b``). Inputs are validated."""
    check_tensor("q", q)
    if not isinstance(branches, (tuple, list)) or len(branches) not in (2, 3):
        raise TypeError(f"branches must be a tuple of two or three tensors, got {type(branches).__name__}")
    for index, branch in enumerate(branches):
        check_tensor(f"branches[{index}]", branch)
        if branch.shape != q.shape or branch.device != q.device:
            raise ValueError(
                f"branches[{index}] must have q's shape {tuple(q.shape)} on {q.device}, got {tuple(branch.shape)} on "
                f"{branch.device}"
            )
    heads, dim = q.shape[1], q.shape[3]
    for name, x, shape in (("weight", weight, (heads, dim)), ("bias", bias, (heads,))):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[:-1]) != shape or x.shape[-1] < len(branches) or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a float tensor of shape {(*shape, 'G >= branches')}, got {tuple(x.shape)}"
            )
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}")
    if weight.shape[-1] != bias.shape[-1]:
        raise ValueError(f"weight and bias must have as many gates, got {weight.shape[-1]} and {bias.shape[-1]}")
    branches = tuple(branches)
    kernel = kernel_for(q, __package__, head_dim=dim)
    if kernel is None:
        return gated_sum_reference(q, branches, weight, bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, *branches, weight, bias)):
        return _GatedSum.apply(kernel, q, weight, bias, *branches)
    return kernel.gated_sum_triton(q, branches, weight, bias)


class _GatedSum(torch.autograd.Function):
    """The kernels' gated sum, differentiable in q, the branches, the weight and the bias."""

    @staticmethod
    def forward(ctx, kernel, q, weight, bias, *branches):
        ctx.kernel = kernel
        ctx.save_for_backward(q, weight, bias, *branches)
        return kernel.gated_sum_triton(q, branches, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        q, weight, bias, *branches = ctx.saved_tensors
        dq, d_branches, d_weight, d_bias = ctx.kernel.gated_sum_backward_triton(
            q, tuple(branches), weight, bias, grad_out
        )
        return None, dq, d_weight, d_bias, *d_branches
