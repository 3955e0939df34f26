"""The last step of every estimator: a bool block mask becomes a :class:`BlockSparsePattern`."""

from __future__ import annotations

import torch

from ..pattern import BlockSparsePattern

__all__ = ["block_mask_to_pattern"]


def block_mask_to_pattern(
    mask: torch.Tensor, *, seq_q: int, seq_k: int, block_q: int, block_k: int, causal: bool
) -> BlockSparsePattern:
    """A pattern from a bool block mask ``(n_q, n_kv)`` or ``(B, H, n_q, n_kv)``.

    Causal mode drops future blocks and adds each query block's diagonal (``from_mask``). In
    non-causal mode a row left empty keeps its highest-numbered block, so the result is valid.
    A 2-D mask (a static layout) gives one list shared by the whole batch and every head.
    """
    if not causal:
        empty = ~mask.any(-1, keepdim=True)
        if bool(empty.any()):
            last = torch.zeros_like(mask)
            last[..., -1] = True
            mask = mask | (empty & last)
    return BlockSparsePattern.from_mask(
        mask.contiguous(), block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal
    )
