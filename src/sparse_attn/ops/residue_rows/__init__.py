"""NSA's residue regrouping of the compressed branch's rows (:meth:`sparse_attn.nn.nsa.NativeSparseAttention.compressed_branch`).

Query position ``p`` sees the compressed tokens ``i <= (p + 1) // d - l / d``, a bound shared by
the ``d`` positions with the same ``(p + 1) // d``; regrouped so that each residue ``(p + 1) % d``
is a batch entry with one row per ``(p + 1) // d``, the branch is ordinary causal attention.
:func:`to_residues` moves ``(B, H, S, ...)`` tokens (token ``t`` at padded index ``front + t``) to
``(B * d, H, rows - skip, ...)`` (zeros where no token is); :func:`from_residues` is its inverse,
``fill`` for tokens whose row is before ``skip``. Each is the other's gradient.

Reference: :mod:`.naive` (strided copies; every shape, the log-sum-exp's three dimensions
included). Kernel: :mod:`.triton` (one row gather each way), chosen on CUDA by the rule of
:mod:`sparse_attn.ops._dispatch` for ``(B, H, S, D)`` tensors with a power-of-two ``D`` from 16 to
256; differentiable through :class:`_Regroup`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import from_residues_reference, to_residues_reference

__all__ = ["from_residues", "to_residues"]


def _kernel(x: torch.Tensor):
    if x.dim() != 4:  # the log-sum-exp (B, H, S): the reference's copies (small)
        return None
    return kernel_for(x, __package__)


def to_residues(x: torch.Tensor, front: int, rows: int, stride: int, skip: int = 0) -> torch.Tensor:
    """``(B, H, S, ...)`` -> ``(B * d, H, rows - skip, ...)``: the token at padded index ``front + t``
    goes to batch entry ``b * d + (front + t) % d``, row ``(front + t) // d - skip`` (zeros where no token is)."""
    kernel = _kernel(x)
    if kernel is None:
        return to_residues_reference(x, front, rows, stride, skip)
    options = dict(front=front, stride=stride, skip=skip, seq=x.shape[2], rows=rows)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Regroup.apply(x, kernel, True, options)
    return kernel.regroup_triton(x, to_residue=True, front=front, stride=stride, skip=skip, rows=rows)


def from_residues(x: torch.Tensor, front: int, seq: int, stride: int, skip: int = 0, fill: float = 0.0) -> torch.Tensor:
    """The inverse of :func:`to_residues` on ``(B * d, H, rows - skip, ...)``: ``(B, H, seq, ...)``,
    tokens whose row is before ``skip`` (or past the rows) set to ``fill``."""
    kernel = _kernel(x)
    if kernel is None:
        return from_residues_reference(x, front, seq, stride, skip, fill)
    options = dict(front=front, stride=stride, skip=skip, seq=seq, rows=x.shape[2] + skip)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Regroup.apply(x, kernel, False, options, fill)
    return kernel.regroup_triton(x, to_residue=False, front=front, stride=stride, skip=skip, rows=seq, fill=fill)


class _Regroup(torch.autograd.Function):
    """The kernel's regrouping, differentiable: each direction's gradient is the other direction
    (with zeros for the cells and tokens the forward filled)."""

    @staticmethod
    def forward(ctx, x, kernel, to_residue, options, fill=0.0):
        ctx.kernel, ctx.to_residue, ctx.options = kernel, to_residue, options
        rows = options["rows"] if to_residue else options["seq"]
        return kernel.regroup_triton(
            x, to_residue=to_residue, front=options["front"], stride=options["stride"], skip=options["skip"],
            rows=rows, fill=fill,
        )  # fmt: skip

    @staticmethod
    def backward(ctx, grad):
        o = ctx.options
        back = not ctx.to_residue
        rows = o["rows"] if back else o["seq"]
        grad_x = ctx.kernel.regroup_triton(
            grad, to_residue=back, front=o["front"], stride=o["stride"], skip=o["skip"], rows=rows
        )
        return grad_x, None, None, None, None
