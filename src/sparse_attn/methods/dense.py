"""Dense: every causally valid block (the exact-attention baseline; no estimation work)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pattern import BlockSparsePattern, dense_pattern
from ..registry import register_method


@dataclass(frozen=True)
class DenseConfig:
    """No hyperparameters."""


@register_method("dense", config=DenseConfig, paper="-", summary="all causal blocks (exact attention)")
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: DenseConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    # One list shared by the whole batch and each KV head's group.
    return dense_pattern(
        batch=1,
        heads=k.shape[1],
        seq_q=q.shape[2],
        seq_k=k.shape[2],
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
    )
