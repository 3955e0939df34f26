"""Grouped-query attention helpers of the operators: query heads share KV heads without expanding K."""

from __future__ import annotations

import torch

__all__ = ["gqa_group", "grouped_matmul"]


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
