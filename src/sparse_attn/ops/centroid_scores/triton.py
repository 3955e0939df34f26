"""The centroid scores in one pass over the centroids.

One program per (sequence, KV head, chunk of ``BLOCK_C`` clusters): the group's query heads are
loaded as rows of one tile and summed in float32, each centroid row is read once in its own
dtype, and its product with the summed query is reduced in float32 (no ``tl.dot``: one query
vector, so the work is a bandwidth-bound matrix-vector product). Clusters of size 0 are
written ``-inf`` without reading their centroid.
"""

from __future__ import annotations

import torch

from ...backends import launch
from ..page_bounds.triton import unsupported_reason as grouped_tile_unsupported_reason

try:
    import triton
    import triton.language as tl

    from .._triton_util import group_rows
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["centroid_scores_triton", "unsupported_reason"]


def unsupported_reason(q: torch.Tensor, *, head_dim: int) -> str | None:
    """Why :func:`centroid_scores_triton` cannot run this case, or ``None``."""
    return grouped_tile_unsupported_reason(q, head_dim=head_dim)


if triton is not None:

    @triton.jit
    def _centroid_scores(
        Q,
        Centroids,
        Sizes,
        Out,
        stride_qb,
        stride_qh,
        stride_cb,
        stride_ch,
        stride_cc,
        stride_sb,
        stride_sh,
        num_kv_heads,
        group,
        clusters,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        batch = tl.program_id(0) // num_kv_heads
        kv_head = tl.program_id(0) % num_kv_heads
        q, _, _, _ = group_rows(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM, BLOCK_G)
        group_q = tl.sum(q.to(tl.float32), 0)
        offs_d = tl.arange(0, HEAD_DIM)
        index = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_range = index < clusters
        size = tl.load(Sizes + batch.to(tl.int64) * stride_sb + kv_head * stride_sh + index, mask=in_range, other=0)
        used = size > 0
        base = Centroids + batch.to(tl.int64) * stride_cb + kv_head.to(tl.int64) * stride_ch
        rows_c = tl.load(
            base + index[:, None].to(tl.int64) * stride_cc + offs_d[None, :], mask=used[:, None], other=0.0
        )
        scores = tl.sum(rows_c.to(tl.float32) * group_q[None, :], 1)
        out = Out + (batch * num_kv_heads + kv_head).to(tl.int64) * clusters + index
        tl.store(out, tl.where(used, scores, float("-inf")), mask=in_range)


def centroid_scores_triton(q: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """:func:`.naive.centroid_scores_reference` in one kernel; same arguments and result."""
    batch, q_heads, dim = q.shape
    reason = unsupported_reason(q, head_dim=dim)
    if reason is not None:
        raise ValueError(f"the centroid scores kernel cannot run this case: {reason}")
    kv_heads, clusters = centroids.shape[1], centroids.shape[2]
    if centroids.shape != (batch, kv_heads, clusters, dim) or sizes.shape != (batch, kv_heads, clusters):
        raise ValueError(
            f"centroids {tuple(centroids.shape)} / sizes {tuple(sizes.shape)} must be (B, Hkv, C, D) / (B, Hkv, C) "
            f"for q {tuple(q.shape)}"
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    centroids = centroids if centroids.stride(-1) == 1 else centroids.contiguous()
    out = launch.allocate((batch, kv_heads, clusters), torch.float32, q.device)
    block_c = 64 if dim <= 128 else 32
    grid = (batch * kv_heads, triton.cdiv(clusters, block_c))
    _centroid_scores[grid](
        q, centroids, sizes, out, *q.stride()[:2], *centroids.stride()[:3], *sizes.stride()[:2],
        kv_heads, q_heads // kv_heads, clusters,
        HEAD_DIM=dim, BLOCK_G=triton.next_power_of_2(q_heads // kv_heads), BLOCK_C=block_c,
    )  # fmt: skip
    return out
