"""Closed-form block layouts shared by the estimators: sinks, local windows, power-of-two
distances and strided shards.

Everything here depends only on the geometry (lengths and block sizes), never on q/k
values, and works on bool ``(n_q_blocks, n_kv_blocks)`` tables at most (never token-level
``S x S``). Geometry follows :mod:`sparse_attn.pattern`: the queries are the *last*
``seq_q`` of the ``seq_k`` positions, so query block ``i`` holds positions
``[seq_k - seq_q + i * block_q, ...]`` and its *own* KV blocks (the diagonal) are the ones
holding those positions. With ``seq_q < seq_k`` or ``block_q != block_k`` a query block
can own several KV blocks; distances are measured from that span.
"""

from __future__ import annotations

import torch

from ..geometry import causal_block_mask, num_blocks
from ..pattern import BlockSparsePattern

__all__ = [
    "check_int_option",
    "tokens_to_blocks",
    "own_kv_block_span",
    "block_distance",
    "sink_local_block_mask",
    "power_of_two_distance_mask",
    "strided_shard_mask",
    "shared_static_pattern",
]


def check_int_option(name: str, value, minimum: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_window_options(sink_tokens: int, local_tokens: int) -> None:
    """The sink / local-window sizes shared by the A-shape family of configs."""
    check_int_option("sink_tokens", sink_tokens, 0)
    check_int_option("local_tokens", local_tokens, 1)


def tokens_to_blocks(tokens: int, block: int) -> int:
    """Blocks of ``block`` tokens needed to hold ``tokens`` tokens (ceil), so a budget in
    tokens never shrinks when converted."""
    return -(-tokens // block)


def own_kv_block_span(
    seq_q: int, seq_k: int, block_q: int, block_k: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last KV block holding each query block's own positions, int64 ``(n_q_blocks,)``."""
    offset = seq_k - seq_q
    first_query = torch.arange(num_blocks(seq_q, block_q), device=device, dtype=torch.int64) * block_q
    last_query = torch.clamp(first_query + block_q, max=seq_q) - 1
    return (first_query + offset) // block_k, (last_query + offset) // block_k


def block_distance(seq_q: int, seq_k: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """Int64 ``(n_q_blocks, n_kv_blocks)``: how many KV blocks lie between each KV block and
    the query block's own span, in block units.

    0 on the query block's own (diagonal) blocks, ``d`` for the ``d``-th block before the
    span (the past) and equally ``d`` for the ``d``-th block after it (the future, which
    only non-causal attention reaches).
    """
    first, last = own_kv_block_span(seq_q, seq_k, block_q, block_k, device)
    kv_block = torch.arange(num_blocks(seq_k, block_k), device=device, dtype=torch.int64)[None, :]
    before = first[:, None] - kv_block
    after = kv_block - last[:, None]
    return torch.clamp(torch.maximum(before, after), min=0)


def sink_local_block_mask(
    seq_q: int,
    seq_k: int,
    block_q: int,
    block_k: int,
    *,
    sink_blocks: int,
    local_blocks: int,
    device=None,
    causal: bool = True,
) -> torch.Tensor:
    """Bool ``(n_q_blocks, n_kv_blocks)``: the first ``sink_blocks`` KV blocks plus a local window.

    The window is the query block's own KV block(s) and the ``local_blocks - 1`` blocks
    before them, so ``local_blocks=1`` keeps the diagonal only. In causal mode the result
    keeps only causally valid blocks (sinks a query block cannot see yet are dropped); in
    non-causal mode the window is symmetric (``local_blocks - 1`` blocks after the span too).
    """
    check_int_option("sink_blocks", sink_blocks, 0)
    check_int_option("local_blocks", local_blocks, 1)
    distance = block_distance(seq_q, seq_k, block_q, block_k, device)
    kv_block = torch.arange(distance.shape[1], device=device)
    mask = (distance < local_blocks) | (kv_block < sink_blocks)[None, :]
    if causal:
        mask &= causal_block_mask(seq_q, seq_k, block_q, block_k, device)
    return mask


def power_of_two_distance_mask(distance: torch.Tensor) -> torch.Tensor:
    """Bool, same shape as ``distance``: entries whose block distance is 1, 2, 4, 8, ..."""
    return (distance > 0) & ((distance & (distance - 1)) == 0)


def strided_shard_mask(num_heads: int, num_kv_blocks: int, stride: int, device=None) -> torch.Tensor:
    """Bool ``(num_heads, 1, num_kv_blocks)``: head ``h`` owns the KV blocks ``j`` with
    ``j % stride == h % stride``.

    Shards are on absolute block numbers (not on distances), so a block that one head
    keeps it keeps for every query block; any ``stride`` consecutive heads together own
    every block. Broadcasts over query blocks.
    """
    heads = torch.arange(num_heads, device=device)[:, None, None]
    kv_block = torch.arange(num_kv_blocks, device=device)[None, None, :]
    return (kv_block % stride) == (heads % stride)


def token_window_mask(
    q: torch.Tensor, k: torch.Tensor, *, sink_tokens: int, local_tokens: int, block_q: int, block_k: int, causal: bool
) -> torch.Tensor:
    """:func:`sink_local_block_mask` for ``q``/``k`` with sink and window sizes in tokens (ceil to blocks)."""
    return sink_local_block_mask(
        q.shape[2],
        k.shape[2],
        block_q,
        block_k,
        sink_blocks=tokens_to_blocks(sink_tokens, block_k),
        local_blocks=tokens_to_blocks(local_tokens, block_k),
        device=q.device,
        causal=causal,
    )


def shared_static_pattern(
    mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Pattern from one bool ``(n_q_blocks, n_kv_blocks)`` mask shared by the whole batch
    and every head: batch 1, heads 1, so no list is stored twice."""
    return BlockSparsePattern.from_mask(
        mask,
        block_q=block_q,
        block_k=block_k,
        seq_q=q.shape[2],
        seq_k=k.shape[2],
        causal=causal,
    )
