"""Block maxima of logits in PyTorch: the reference of the kernel in :mod:`.triton` (and the path off CUDA)."""

from __future__ import annotations

import torch

from ...geometry import num_blocks
from .._chunking import CHUNK_ELEMENTS
from ..gqa import grouped_matmul

__all__ = ["block_max_logits"]


def block_max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_k: int,
    q_positions: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per query row and KV block, the largest logit ``(q · k) * key_scale + key_bias`` over the block's keys.

    q ``(B, Hq, R, D)`` (rows: query tokens or pooled queries, already scaled as the caller
    wants), k ``(B, Hkv, Sk, D)`` (GQA by index, not expanded; any dtype that converts to
    float32, low-bit codes included); products are float32. ``key_scale`` float32
    ``(B, Hkv, Sk)`` multiplies each key's logits (the per-token scale of quantised keys);
    ``key_bias`` float32 ``(B, Hq, Sk)`` is added to them. ``q_positions`` int64 ``(R,)``: when
    given, keys after a row's position are masked (causal); a block with no visible key gives
    ``-inf``. Returns float32 ``(B, Hq, R, n_kv)``.

    Keys are processed a chunk of whole KV blocks at a time so that the chunk's logits stay
    within half of ``CHUNK_ELEMENTS`` floats (at least one block).
    """
    batch, q_heads, rows, _ = q.shape
    seq_k = k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    q = q.float()
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (2 * batch * q_heads * max(1, rows) * block_k))
    out = torch.empty((batch, q_heads, rows, n_kv), dtype=torch.float32, device=q.device)
    for first in range(0, n_kv, blocks_per_chunk):
        last = min(n_kv, first + blocks_per_chunk)
        start, stop = first * block_k, min(seq_k, last * block_k)
        logits = grouped_matmul(q, k[:, :, start:stop].float())
        if key_scale is not None:
            grouped = logits.view(batch, k.shape[1], -1, stop - start)
            grouped *= key_scale[:, :, None, start:stop]
        if key_bias is not None:
            logits += key_bias[..., None, start:stop]
        if q_positions is not None:
            keys = torch.arange(start, stop, device=q.device)
            logits.masked_fill_(keys[None, :] > q_positions[:, None], float("-inf"))
        padding = (last - first) * block_k - (stop - start)
        if padding:
            # The last partial block: its missing keys must never be the maximum.
            logits = torch.nn.functional.pad(logits, (0, padding), value=float("-inf"))
        out[..., first:last] = logits.view(batch, q_heads, rows, last - first, block_k).amax(-1)
        del logits
    return out
