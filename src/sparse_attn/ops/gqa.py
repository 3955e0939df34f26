"""Grouped-query attention helpers of the operators: query heads share KV heads without expanding K."""

from __future__ import annotations

import torch

__all__ = ["gqa_group", "grouped_matmul", "head_chunks", "kv_heads_of"]


def gqa_group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per KV head."""
    return q.shape[1] // k.shape[1]


def grouped_matmul(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` per query head without expanding K over its GQA group.

    q ``(B, Hq, M, D)``, k ``(B, Hkv, N, D)`` -> ``(B, Hq, M, N)`` in q's dtype. Query head
    ``h`` uses KV head ``h // group``, which is the order of a ``(Hkv, group)`` reshape.
    """
    batch, q_heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    grouped = q.reshape(batch, kv_heads, (q_heads // kv_heads) * rows, dim)
    return torch.matmul(grouped, k.transpose(-1, -2)).view(batch, q_heads, rows, k.shape[2])


def head_chunks(q_heads: int, group: int, heads_per_chunk: int) -> list[range]:
    """Query-head ranges of at most ``heads_per_chunk`` heads, each within one KV head or made of
    whole GQA groups (so a chunk reads one contiguous range of KV heads, :func:`kv_heads_of`).
    """
    if heads_per_chunk >= group:
        size = (heads_per_chunk // group) * group
    else:
        size = max(divisor for divisor in range(1, group + 1) if group % divisor == 0 and divisor <= heads_per_chunk)
    return [range(start, min(q_heads, start + size)) for start in range(0, q_heads, size)]


def kv_heads_of(heads: range, group: int) -> slice:
    """The KV heads that the query heads of one :func:`head_chunks` range read."""
    first = heads.start // group
    return slice(first, max(first + 1, heads.stop // group))
