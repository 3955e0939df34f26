"""Anchor-region statistics in PyTorch: the reference of :mod:`.triton` (and the path off CUDA)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...geometry import num_blocks, own_kv_block_span
from .._chunking import CHUNK_ELEMENTS
from ..block_rows import query_block_range

__all__ = ["AnchorStats", "anchor_region_stats", "region_blocks", "region_width"]


@dataclass(frozen=True)
class AnchorStats:
    """Per query row, over the keys of its anchor region: the largest scaled logit and the log-sum-exp.

    Both float32 ``(B, Hq, R)`` for the ``R`` query rows of the query blocks asked for.
    """

    row_max: torch.Tensor
    row_lse: torch.Tensor


def region_blocks(sink_tokens: int, local_tokens: int, block_k: int, seq_k: int) -> dict[str, int]:
    """``sink_blocks`` and ``local_blocks`` of a region given in tokens (ceil: a region never
    shrinks), each at most the sequence's blocks: a longer sink or window already covers every
    key, and sizing the region's logits by it would allocate for keys that do not exist."""
    n_kv = num_blocks(seq_k, block_k)  # >= 1: the estimators take seq_k >= seq_q >= 1
    return dict(
        sink_blocks=min(num_blocks(sink_tokens, block_k), n_kv),
        local_blocks=min(num_blocks(local_tokens, block_k), n_kv),
    )


def region_width(block_q: int, block_k: int, sink_blocks: int, local_blocks: int) -> int:
    """An upper bound on the keys of one query block's region (for sizing chunks): its logits are
    ``block_q x region_width`` per head."""
    own_blocks = -(-block_q // block_k) + 1
    return (sink_blocks + 2 * local_blocks + own_blocks) * block_k


def _region_positions(
    seq_q: int, seq_k: int, block_q: int, block_k: int, rows: range, sink_blocks: int, local_blocks: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions int64 ``(len(rows), W)`` of each query block's region and their validity (bool).

    The region is the first ``sink_blocks`` KV blocks, the query block's own KV blocks and the
    ``local_blocks - 1`` blocks before them (also after them when not causal); a key in both
    the sinks and the window counts once (in the sinks).
    """
    first, last = (span[rows.start : rows.stop] for span in own_kv_block_span(seq_q, seq_k, block_q, block_k))
    n_kv = num_blocks(seq_k, block_k)
    sink_end = min(sink_blocks, n_kv) * block_k
    after = 0 if causal else local_blocks - 1
    window_blocks = int((last - first).max()) + local_blocks + after
    window_start = (first - (local_blocks - 1)) * block_k
    window = window_start[:, None] + torch.arange(window_blocks * block_k)[None, :]
    window_valid = (window >= sink_end) & (window < seq_k) & (window // block_k <= (last + after)[:, None])
    sinks = torch.arange(sink_end).expand(len(rows), sink_end)
    positions = torch.cat([sinks, window], dim=1)
    valid = torch.cat([sinks < seq_k, window_valid], dim=1)
    return positions.clamp(0, seq_k - 1), valid


def anchor_region_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    sink_blocks: int,
    local_blocks: int,
    scale: float,
    causal: bool,
    q_blocks: range | None = None,
) -> AnchorStats:
    """Row maxima and log-sum-exps of ``scale * q · k`` over each query row's anchor region.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` (GQA by index), queries the last ``Sq`` of ``Sk``
    positions. The region of a query block: KV blocks ``[0, sink_blocks)``, its own KV blocks
    and the ``local_blocks - 1`` before them (``local_blocks >= 1``); in causal mode keys after
    a row's position are masked, so every row keeps at least its own key. Only the rows of
    query blocks ``q_blocks`` (default: all) are computed, a few query blocks at a time so that
    their region logits stay within half of ``CHUNK_ELEMENTS`` floats; only the gathered
    region keys are converted to float32 (never the whole of k). Float32 throughout.
    """
    batch, q_heads = q.shape[:2]
    blocks = query_block_range(num_blocks(q.shape[2], block_q), q_blocks)
    width = region_width(block_q, block_k, sink_blocks, local_blocks)
    per_block = max(1, CHUNK_ELEMENTS // (2 * batch * q_heads * block_q * width))
    region = dict(block_q=block_q, block_k=block_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    pieces = [
        range(start, min(start + per_block, blocks.stop)) for start in range(blocks.start, blocks.stop, per_block)
    ]
    parts = [_region_stats(q, k, **region, scale=scale, causal=causal, blocks=piece) for piece in pieces or [blocks]]
    if len(parts) == 1:
        return parts[0]
    return AnchorStats(
        row_max=torch.cat([part.row_max for part in parts], dim=-1),
        row_lse=torch.cat([part.row_lse for part in parts], dim=-1),
    )


def _region_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    sink_blocks: int,
    local_blocks: int,
    scale: float,
    causal: bool,
    blocks: range,
) -> AnchorStats:
    """:func:`anchor_region_stats` for the query blocks ``blocks`` at once."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    positions, valid = _region_positions(seq_q, seq_k, block_q, block_k, blocks, sink_blocks, local_blocks, causal)
    positions, valid = positions.to(q.device), valid.to(q.device)
    n, width = positions.shape
    first_row, end_row = blocks.start * block_q, min(blocks.stop * block_q, seq_q)
    rows = q[:, :, first_row:end_row].float()
    rows = F.pad(rows, (0, 0, 0, n * block_q - rows.shape[2]))
    rows = rows.view(batch, kv_heads, group, n, block_q, dim)
    keys = k[:, :, positions.flatten()].float().view(batch, kv_heads, n, width, dim)
    logits = torch.einsum("bhgnqd,bhnwd->bhgnqw", rows, keys) * scale
    del keys
    query_positions = seq_k - seq_q + first_row + torch.arange(n * block_q, device=q.device).view(n, block_q)
    visible = valid[:, None, :]
    if causal:
        visible = visible & (positions[:, None, :] <= query_positions[:, :, None])
    logits.masked_fill_(~visible, float("-inf"))
    logits = logits.reshape(batch, q_heads, n * block_q, width)[:, :, : end_row - first_row]
    return AnchorStats(row_max=logits.amax(-1), row_lse=torch.logsumexp(logits, dim=-1))
