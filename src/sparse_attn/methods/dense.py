"""Dense: every causally valid block (the exact-attention baseline; no estimation work).

The lists are written a chunk of query blocks at a time (:func:`sparse_attn.ops.to_pattern.stream_pattern`),
so no ``(heads, n_q, n_kv)`` mask is built: the pattern itself is the only large tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class DenseConfig:
    """No hyperparameters."""


@register_method("dense", config=DenseConfig, paper="-", summary="all causal blocks (exact attention)")
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: DenseConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    every_block = torch.ones((), dtype=torch.bool, device=q.device)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        return every_block.expand(len(q_blocks), num_blocks(k.shape[2], block_k))

    # One list shared by the whole batch and each KV head's group; the pattern keeps the valid blocks.
    return stream_pattern(
        mask_rows,
        batch=1,
        heads=k.shape[1],
        seq_q=q.shape[2],
        seq_k=k.shape[2],
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
        row_elements=k.shape[1] * num_blocks(k.shape[2], block_k),
    )
