"""NSA's gated sum of its branch outputs in PyTorch: the reference, the CPU path and the differentiable path."""

from __future__ import annotations

import torch

__all__ = ["gated_sum_reference"]


def gated_sum_reference(
    q: torch.Tensor, branches: tuple[torch.Tensor, ...], weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """:func:`sparse_attn.ops.gated_sum.gated_sum` in PyTorch: same arguments and result.

    The gates' product is taken in q's dtype (``einsum`` on q and ``weight`` cast to it), the
    bias added and the sigmoid taken in float32 (the bias's dtype promotes it), the branches
    weighted and summed in float32, the result cast to q's dtype."""
    gates = torch.sigmoid(torch.einsum("bhsd,hdg->bhsg", q, weight.to(q.dtype)) + bias[:, None])
    # Gates as (branches, B, H, S, 1) (small), then one multiply and one fused multiply-add per branch.
    gate = gates.movedim(-1, 0).contiguous().unsqueeze(-1)
    out = branches[0] * gate[0]
    for index, branch in enumerate(branches[1:], start=1):
        out = torch.addcmul(out, branch, gate[index])
    return out.to(q.dtype)
