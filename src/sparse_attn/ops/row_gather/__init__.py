"""Row gather along the sequence: ``out[b, h, p] = x[b, h, index[p]]`` for ``(B, H, S, D)`` tensors.

The layout permutation of the spatial methods (:meth:`sparse_attn.layouts.Layout.permute`) moves
q, k and v into a tile order and the output back, four gathers of whole ``D``-element rows per
attention call. ``torch.index_select`` along dimension 2 runs one thread per element with
index arithmetic per element; the Triton kernel (:mod:`.triton`) copies whole rows (one index
load per row, vectorised row copies), on CUDA for 2- and 4-byte dtypes with contiguous rows
(``(B, H, S)`` tensors, such as a log-sum-exp, as rows of one element). The
PyTorch reference (:mod:`.naive`) runs everywhere else. Differentiable in ``x`` on both paths.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import gather_rows as gather_rows_reference

__all__ = ["gather_rows"]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, S, ...)`` gathered along dimension 2 by ``index`` (int64 ``(S_out,)``, values in
    ``[0, S)``, on ``x``'s device); a new contiguous tensor ``(B, H, S_out, ...)``."""
    if x.dim() < 3:
        raise ValueError(f"x must have at least 3 dimensions (B, H, S, ...), got shape {tuple(x.shape)}")
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"index must be a 1D int64 tensor, got {index.dtype} of shape {tuple(index.shape)}")
    if x.dim() == 3:  # (B, H, S): one value per token (a log-sum-exp), gathered as rows of one element
        return gather_rows(x.unsqueeze(-1), index).squeeze(-1)
    kernel = kernel_for(x, __name__, index=index)
    if kernel is None:
        return gather_rows_reference(x, index)
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherRows.apply(x, index, kernel.gather_rows)
    return kernel.gather_rows(x, index)


class _GatherRows(torch.autograd.Function):
    """The kernel's gather, differentiable in ``x``: the gradient is the output gradient added back
    at the gathered rows (``index_add``, so repeated indices accumulate)."""

    @staticmethod
    def forward(ctx, x, index, gather):
        ctx.save_for_backward(index)
        ctx.source_shape = x.shape
        return gather(x, index)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        grad = grad_out.new_zeros(ctx.source_shape)
        return grad.index_add_(2, index, grad_out), None, None
