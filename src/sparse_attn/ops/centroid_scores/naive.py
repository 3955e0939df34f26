"""PyTorch reference of the centroid scores (float32 products of float32 copies)."""

from __future__ import annotations

import torch

__all__ = ["centroid_scores_reference"]


def centroid_scores_reference(q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """See :func:`sparse_attn.ops.centroid_scores.centroid_scores`."""
    batch, q_heads, dim = q.shape
    kv_heads = centroids.shape[1]
    if centroids.dim() != 4 or centroids.shape[0] != batch or centroids.shape[3] != dim or q_heads % kv_heads:
        raise ValueError(f"centroids {tuple(centroids.shape)} must be (B, Hkv, C, D) for q {tuple(q.shape)}")
    if sizes.shape != centroids.shape[:3]:
        raise ValueError(f"sizes {tuple(sizes.shape)} must be (B, Hkv, C) = {tuple(centroids.shape[:3])}")
    group_q = q.float().view(batch, kv_heads, q_heads // kv_heads, dim).sum(2)
    scores = torch.matmul(centroids.float(), group_q[..., None])[..., 0]
    return scores.masked_fill(sizes == 0, float("-inf"))
