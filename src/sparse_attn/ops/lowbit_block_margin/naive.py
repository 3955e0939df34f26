"""Block margins of low-bit logits in PyTorch: the reference of :mod:`.triton` (and the path off CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...geometry import num_blocks
from .._chunking import CHUNK_ELEMENTS
from ..block_max.naive import block_max_logits

__all__ = ["lowbit_block_margin"]


def lowbit_block_margin(
    q_codes: torch.Tensor,
    q_scale: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    row_threshold: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    key_bias: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """See :func:`sparse_attn.ops.lowbit_block_margin.lowbit_block_margin`.

    The rows are dequantised (``q_codes * q_scale`` in float32) and each row's largest
    ``logit`` per KV block is taken by :func:`~sparse_attn.ops.block_max.naive.block_max_logits`
    (codes as float32 keys, ``k_scale`` and ``key_bias`` applied there); the row's threshold is
    subtracted and the rows of each query block reduced. A few query blocks at a time, so the
    per-row table stays within ``CHUNK_ELEMENTS``.
    """
    batch, q_heads, rows, dim = q_codes.shape
    n_kv = num_blocks(k_codes.shape[2], block_k)
    n_blocks = num_blocks(rows, block_q)
    out = torch.empty((batch, q_heads, n_blocks, n_kv), dtype=torch.float32, device=q_codes.device)
    step = max(1, CHUNK_ELEMENTS // max(1, batch * q_heads * block_q * (n_kv + dim)))
    for first in range(0, n_blocks, step):
        start, end = first * block_q, min(rows, (first + step) * block_q)
        q = q_codes[:, :, start:end].float() * q_scale[:, :, start:end, None].float()
        maxima = block_max_logits(
            q,
            k_codes,
            block_k=block_k,
            q_positions=None if q_positions is None else q_positions[start:end],
            key_scale=k_scale,
            key_bias=key_bias,
        )
        del q
        margin = maxima - row_threshold[:, :, start:end, None].float()
        del maxima
        blocks = num_blocks(end - start, block_q)
        margin = F.pad(margin, (0, 0, 0, blocks * block_q - (end - start)), value=float("-inf"))
        out[:, :, first : first + blocks] = margin.view(batch, q_heads, blocks, block_q, n_kv).amax(dim=3)
    return out
