"""Quest's per-page bound of ``q · k`` in PyTorch: the reference of :mod:`.triton` and the CPU path."""

from __future__ import annotations

import torch

__all__ = ["page_bounds_reference"]


def page_bounds_reference(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    page_size: int,
    scale: float,
    newest_first: bool = False,
) -> torch.Tensor:
    """Per KV head and logical page, the group's summed bounds ``scale * sum_h sum_d max(q_hd min_d, q_hd max_d)``,
    float32 ``(B, Hkv, max_pages)``.

    Arguments as in :func:`sparse_attn.ops.page_bounds.page_bounds`. Pages at or past a
    sequence's end are ``-inf``. ``max(q m, q M) = max(q, 0) M + min(q, 0) m`` makes the bounds
    of all pages two grouped matrix products. Memory: the gathered summaries, float32
    ``(B, Hkv, D, max_pages)`` twice.
    """
    batch, q_heads, dim = q.shape
    kv_heads = key_min.shape[1]
    table = page_table.long()
    # (B, max_pages, Hkv, D) -> (B, Hkv, D, max_pages)
    upper = key_max[table].permute(0, 2, 3, 1).float()
    lower = key_min[table].permute(0, 2, 3, 1).float()
    grouped = q.float().view(batch, kv_heads, q_heads // kv_heads, dim)
    bounds = (grouped.clamp(min=0) @ upper + grouped.clamp(max=0) @ lower).sum(2) * scale
    pages = (seq_lens.long() + page_size - 1) // page_size
    index = torch.arange(bounds.shape[-1], device=q.device)
    bounds = bounds.masked_fill(index >= pages[:, None, None], float("-inf"))
    return bounds.masked_fill(index == pages[:, None, None] - 1, float("inf")) if newest_first else bounds
