"""NSA's selection-block scores from the compressed branch's log-sum-exp, in PyTorch (the reference and the CPU path)."""

from __future__ import annotations

import torch

from .._chunking import CHUNK_ELEMENTS

__all__ = ["compressed_block_scores", "spread_to_blocks", "visible_count"]


def visible_count(position: int, compress_block: int, compress_stride: int, n_cmp: int) -> int:
    """How many compressed keys (``0 .. count-1``) the query at key position ``position`` sees:
    key ``i`` is visible iff ``i * d + l - 1 <= position``."""
    if position < compress_block - 1:
        return 0
    return min(n_cmp, (position - compress_block + 1) // compress_stride + 1)


def spread_to_blocks(
    key_scores: torch.Tensor, pieces_per_key: int, pieces_per_block: int, n_select: int
) -> torch.Tensor:
    """Selection-block scores ``(..., n_select)`` from per-compressed-key scores ``(..., n)`` (float32):
    key ``i`` covers stride pieces ``i .. i + pieces_per_key - 1`` and adds its score to each; block
    ``j`` sums its ``pieces_per_block`` pieces. Pieces past the last block are dropped."""
    n_pieces, visible = n_select * pieces_per_block, key_scores.shape[-1]
    pieces = key_scores.new_zeros((*key_scores.shape[:-1], max(n_pieces, visible + pieces_per_key - 1)))
    for piece in range(pieces_per_key):
        pieces[..., piece : piece + visible] += key_scores
    return pieces[..., :n_pieces].reshape(*key_scores.shape[:-1], n_select, pieces_per_block).sum(-1)


def compressed_block_scores(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    *,
    first_pos: int,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    n_select: int,
    scale: float,
) -> torch.Tensor:
    """Float32 ``(B, Hkv, c, n_select)`` selection-block scores of a chunk of ``c`` query tokens.

    ``out[b, g, t, j] = sum_{h in group g} sum_{i visible to t} exp(scale * q[b, h, t] . k_cmp[b, g, i]
    - lse[b, h, t]) * overlap(i, j) / d``, with ``overlap(i, j)`` the number of key positions
    compressed block ``i`` (``[i d, i d + l)``) shares with selection block ``j``
    (``[j l', (j + 1) l')``). Inputs are validated by :func:`sparse_attn.ops.compressed_scores.compressed_block_scores`.

    Because ``l`` and ``l'`` are multiples of ``d``, positions come in stride pieces of ``d``: block
    ``i`` holds pieces ``i .. i + l/d - 1`` and selection block ``j`` pieces ``j l'/d .. (j + 1) l'/d - 1``.
    So each key's probability is added to its ``l/d`` pieces and the pieces are summed per selection
    block; no overlap matrix is built. Products and exponentials in float32. Chunked over KV heads
    and query rows: one step's logits ``(B, G, rows, n_visible)`` and pieces ``(B, rows, n_select l'/d)``
    stay within a quarter of ``CHUNK_ELEMENTS`` (at least one row).
    """
    batch, q_heads, chunk, _ = q.shape
    kv_heads, n_cmp = k_cmp.shape[1], k_cmp.shape[2]
    group = q_heads // kv_heads
    pieces_per_key = compress_block // compress_stride
    pieces_per_block = select_block // compress_stride
    n_pieces = n_select * pieces_per_block
    out = torch.zeros((batch, kv_heads, chunk, n_select), dtype=torch.float32, device=q.device)
    ends = torch.arange(n_cmp, device=q.device) * compress_stride + compress_block - 1
    per_row = batch * (group * max(1, n_cmp) + n_pieces)
    rows_per_step = max(1, CHUNK_ELEMENTS // (4 * per_row))
    for kv_head in range(kv_heads):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        for start in range(0, chunk, rows_per_step):
            stop = min(chunk, start + rows_per_step)
            n_visible = visible_count(first_pos + stop - 1, compress_block, compress_stride, n_cmp)
            if n_visible == 0:
                continue  # no row of the step sees a compressed key: its scores stay 0
            positions = torch.arange(start, stop, device=q.device) + first_pos
            keys = k_cmp[:, kv_head, :n_visible].float()
            logits = torch.matmul(q[:, heads, start:stop].float(), keys[:, None].transpose(-1, -2)) * scale
            row_lse = lse[:, heads, start:stop, None]
            visible = (ends[:n_visible][None, :] <= positions[:, None]) & (row_lse > float("-inf"))
            # exp(logit - (-inf)) is inf for a row that sees nothing; `where` drops it without a NaN.
            probabilities = torch.where(visible, torch.exp(logits - row_lse), 0.0).sum(1)  # (B, rows, n_visible)
            out[:, kv_head, start:stop] = spread_to_blocks(probabilities, pieces_per_key, pieces_per_block, n_select)
            del logits, probabilities
    return out
