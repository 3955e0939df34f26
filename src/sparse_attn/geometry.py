"""Block geometry shared by patterns, plans, estimators and backends: one definition each.

Keys are cut into blocks from position 0: KV block ``j`` holds keys
``[j * block_k, min((j + 1) * block_k, seq_k))``. Queries are the *last* ``seq_q`` of the
``seq_k`` positions (chunked prefill and decode are the same call), cut into blocks from the
first query: query block ``i`` holds query rows ``[i * block_q, min((i + 1) * block_q, seq_q))``
at absolute positions ``seq_k - seq_q + row``.

All masks here are over blocks, ``(n_q_blocks, n_kv_blocks)``: O(S² / block²), never per token.
"""

from __future__ import annotations

import torch

__all__ = [
    "causal_block_mask",
    "diagonal_block_mask",
    "fully_visible_block_mask",
    "fully_visible_entries",
    "num_blocks",
    "own_kv_block_span",
    "query_block_positions",
]


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size ``block`` that cover ``length`` tokens (ceil division)."""
    return -(-length // block)


def query_block_positions(seq_q: int, seq_k: int, block_q: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last absolute position of every query block, int64 ``(n_q_blocks,)``."""
    offset = seq_k - seq_q
    starts = torch.arange(num_blocks(seq_q, block_q), device=device, dtype=torch.int64) * block_q
    ends = torch.clamp(starts + block_q, max=seq_q) - 1
    return starts + offset, ends + offset


def own_kv_block_span(
    seq_q: int, seq_k: int, block_q: int, block_k: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last KV block holding each query block's own positions, int64 ``(n_q_blocks,)``."""
    first, last = query_block_positions(seq_q, seq_k, block_q, device)
    return first // block_k, last // block_k


def causal_block_mask(seq_q: int, seq_k: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """Bool ``(n_q_blocks, n_kv_blocks)``: blocks holding at least one causally visible key."""
    _, last = query_block_positions(seq_q, seq_k, block_q, device)
    kv_start = torch.arange(num_blocks(seq_k, block_k), device=device, dtype=torch.int64) * block_k
    return kv_start[None, :] <= last[:, None]


def diagonal_block_mask(seq_q: int, seq_k: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """Bool ``(n_q_blocks, n_kv_blocks)``: the KV blocks that hold the query block's own positions."""
    first, last = own_kv_block_span(seq_q, seq_k, block_q, block_k, device)
    kv_block = torch.arange(num_blocks(seq_k, block_k), device=device, dtype=torch.int64)
    return (kv_block[None, :] >= first[:, None]) & (kv_block[None, :] <= last[:, None])


def fully_visible_entries(
    kv_blocks: torch.Tensor, seq_q: int, seq_k: int, block_q: int, block_k: int, *, causal: bool
) -> torch.Tensor:
    """The full-block rule of :func:`fully_visible_block_mask` for lists: bool, the shape of
    ``kv_blocks`` (int64 ``(..., n_q_blocks, slots)``, KV block numbers listed per query block),
    computed per entry so memory is that of the lists."""
    first, _ = query_block_positions(seq_q, seq_k, block_q, kv_blocks.device)
    kv_end = (kv_blocks + 1) * block_k
    full = kv_end <= seq_k
    if causal:
        full = full & (kv_end - 1 <= first[:, None])
    return full


def fully_visible_block_mask(
    seq_q: int, seq_k: int, block_q: int, block_k: int, *, causal: bool, device=None
) -> torch.Tensor:
    """Bool ``(n_q_blocks, n_kv_blocks)``: the *full-block rule*, blocks every query of the
    block sees in full, so a kernel computes them without any mask.

    A block is full when it lies wholly inside the key sequence and, in causal mode, its last
    key is at or before the first query of the query block. Every other kept block is
    *partial*: the kernel applies the token-level rule (causal / bounds) inside it.
    """
    first, _ = query_block_positions(seq_q, seq_k, block_q, device)
    kv_end = (torch.arange(num_blocks(seq_k, block_k), device=device, dtype=torch.int64) + 1) * block_k
    full = (kv_end <= seq_k)[None, :].expand(first.numel(), -1)
    if causal:
        full = full & (kv_end[None, :] - 1 <= first[:, None])
    return full
