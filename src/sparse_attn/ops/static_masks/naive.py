"""Static block masks in PyTorch (the implementation; there is no fused kernel).

Everything here depends only on the geometry (lengths and block sizes), never on q/k
values, and works on bool ``(n_q_blocks, n_kv_blocks)`` tables at most (never token-level
``S x S``); the tables are built for a range of query blocks at a time when the estimator
streams (``q_blocks``). Geometry follows :mod:`sparse_attn.geometry`: the queries are the *last*
``seq_q`` of the ``seq_k`` positions and each query block's *own* KV blocks (the diagonal)
are the ones holding its positions. With ``seq_q < seq_k`` or ``block_q != block_k`` a query
block can own several KV blocks; distances are measured from that span.
"""

from __future__ import annotations

import torch

from ...checks import check_int
from ...geometry import num_blocks, own_kv_block_span
from ..block_rows import QueryBlocks, causal_block_rows, query_block_range, query_block_rows

__all__ = [
    "block_distance",
    "check_token_window",
    "power_of_two_distance_mask",
    "sink_local_block_mask",
    "strided_shard_mask",
    "token_window_mask",
]


def block_distance(
    seq_q: int, seq_k: int, block_q: int, block_k: int, device=None, *, q_blocks: QueryBlocks | None = None
) -> torch.Tensor:
    """Int64 ``(len(q_blocks), n_kv_blocks)``: how many KV blocks lie between each KV block and
    the query block's own span, in block units, for query blocks ``q_blocks`` (default: all; a
    range or a tuple of block numbers).

    0 on the query block's own (diagonal) blocks, ``d`` for the ``d``-th block before the
    span (the past) and equally ``d`` for the ``d``-th block after it (the future, which
    only non-causal attention reaches).
    """
    first, last = (
        query_block_rows(span, q_blocks) for span in own_kv_block_span(seq_q, seq_k, block_q, block_k, device)
    )
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
    q_blocks: QueryBlocks | None = None,
) -> torch.Tensor:
    """Bool ``(len(q_blocks), n_kv_blocks)``: the first ``sink_blocks`` KV blocks plus a local window.

    The window is the query block's own KV block(s) and the ``local_blocks - 1`` blocks
    before them, so ``local_blocks=1`` keeps the diagonal only. In causal mode the result
    keeps only causally valid blocks (sinks a query block cannot see yet are dropped); in
    non-causal mode the window is symmetric (``local_blocks - 1`` blocks after the span too).
    Only query blocks ``q_blocks`` (default: all; a range or a tuple of block numbers) are built.
    """
    check_int("sink_blocks", sink_blocks, minimum=0)
    check_int("local_blocks", local_blocks, minimum=1)
    rows = q_blocks if isinstance(q_blocks, tuple) else query_block_range(num_blocks(seq_q, block_q), q_blocks)
    distance = block_distance(seq_q, seq_k, block_q, block_k, device, q_blocks=rows)
    kv_block = torch.arange(distance.shape[1], device=device)
    mask = (distance < local_blocks) | (kv_block < sink_blocks)[None, :]
    if causal:
        mask &= causal_block_rows(seq_q, seq_k, block_q, block_k, rows, device)
    return mask


def check_token_window(sink_tokens: int, local_tokens: int, *, sink_name: str = "sink_tokens") -> None:
    """Validate the options of :func:`token_window_mask` (for the configs that take them; ``sink_name``:
    the config's own name for the sink option)."""
    check_int(sink_name, sink_tokens, minimum=0)
    check_int("local_tokens", local_tokens, minimum=1)


def token_window_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    sink_tokens: int,
    local_tokens: int,
    block_q: int,
    block_k: int,
    causal: bool,
    q_blocks: QueryBlocks | None = None,
) -> torch.Tensor:
    """:func:`sink_local_block_mask` for ``q``/``k`` with sink and window sizes in tokens.

    Tokens become blocks by ceil, so a budget in tokens never shrinks when converted.
    """
    return sink_local_block_mask(
        q.shape[2],
        k.shape[2],
        block_q,
        block_k,
        sink_blocks=num_blocks(sink_tokens, block_k),
        local_blocks=num_blocks(local_tokens, block_k),
        device=q.device,
        causal=causal,
        q_blocks=q_blocks,
    )


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
