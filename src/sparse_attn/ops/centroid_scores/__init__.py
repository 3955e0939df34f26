"""Centroid scores (``retrieval``'s search): each cluster centroid's ``q · c``, with ``q`` summed over a GQA group.

``centroids`` ``(B, Hkv, C, D)`` in the keys' dtype, ``sizes`` ``(B, Hkv, C)`` (a cluster of size
0 is padding or empty and scores ``-inf``). Reference: :mod:`.naive`; kernel: :mod:`.triton`
(CUDA, head_dim 16-256: reads the centroids once in their own dtype and writes float32 scores;
the reference first makes a float32 copy of every centroid), chosen by the dispatch rule of
:mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import centroid_scores_reference

__all__ = ["centroid_scores"]


def centroid_scores(q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """float32 ``(B, Hkv, C)``: ``(sum of the group's q) · centroid``, ``-inf`` where ``sizes == 0``.

    q ``(B, Hq, D)``; query head ``h`` belongs to KV head ``h // (Hq / Hkv)``.
    """
    kernel = kernel_for(q, __package__, head_dim=q.shape[-1])
    if kernel is not None:
        return kernel.centroid_scores_triton(q, centroids, sizes)
    return centroid_scores_reference(q, centroids, sizes)
