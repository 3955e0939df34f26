"""The block max-pooled, row-normalised attention map in PyTorch (the reference and the implementation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...geometry import num_blocks
from .._chunking import CHUNK_ELEMENTS
from ..block_rows import query_block_range
from ..gqa import grouped_matmul

__all__ = ["pooled_attention_map"]


def pooled_attention_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool = True,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """Max over each (query block, KV block) of the attention probabilities, rows normalised to sum to 1.

    q ``(B, Hq, Sq, D)`` (the last ``Sq`` of the ``Sk`` positions), k ``(B, Hkv, Sk, D)`` (GQA
    by index, not expanded), any float dtype (products in float32). Returns float32
    ``(B, Hq, len(q_blocks), n_kv)`` for query blocks ``q_blocks`` (default: all):
    ``P[I, J] = max_{i in I, t in J} p_it / sum_J' max_{i in I, t in J'} p_it`` where ``p_it``
    is query ``i``'s exact softmax probability on key ``t`` (causally masked keys have
    probability 0, so a KV block no query of the block sees is 0). A last partial block
    (query or key) is pooled over its real positions.

    Chunked over whole query blocks: a chunk's float32 logits ``(B, Hq, rows, Sk)`` stay
    within a quarter of ``CHUNK_ELEMENTS`` (at least one query block).
    """
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    blocks = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    offset = seq_k - seq_q
    key_positions = torch.arange(n_kv * block_k, device=q.device)
    out = torch.empty((batch, q_heads, len(blocks), n_kv), dtype=torch.float32, device=q.device)
    per_chunk = max(1, CHUNK_ELEMENTS // (4 * batch * q_heads * block_q * n_kv * block_k))
    for first in range(blocks.start, blocks.stop, per_chunk):
        last = min(blocks.stop, first + per_chunk)
        row_start, row_stop = first * block_q, min(seq_q, last * block_q)
        logits = grouped_matmul(q[:, :, row_start:row_stop].float(), k.float()) * scale
        # Padding keys of a partial last block are never a maximum nor part of a row's mass.
        logits = F.pad(logits, (0, n_kv * block_k - seq_k), value=float("-inf"))
        if causal:
            positions = torch.arange(row_start, row_stop, device=q.device) + offset
            logits.masked_fill_(key_positions[None, :] > positions[:, None], float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        by_block = logits.view(batch, q_heads, row_stop - row_start, n_kv, block_k).amax(-1)
        del logits
        probs = torch.exp(by_block - row_lse)  # the largest probability of each row in each KV block
        # Rows of a partial last query block are padded with zeros, which never win a maximum.
        probs = F.pad(probs, (0, 0, 0, (last - first) * block_q - (row_stop - row_start)))
        pooled = probs.view(batch, q_heads, last - first, block_q, n_kv).amax(3)
        out[:, :, first - blocks.start : last - blocks.start] = pooled / pooled.sum(-1, keepdim=True)
        del probs, by_block
    return out
