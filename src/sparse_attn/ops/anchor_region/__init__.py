"""Anchor-region statistics: exact logits of each query row over its sink and local key blocks, reduced.

SALE and AnchorAttention both compute attention exactly over the region every head attends
to most (the first key blocks, the sinks, and the blocks around the diagonal) and judge every
other key against it: SALE against the region's softmax denominator (its log-sum-exp),
AnchorAttention against its largest score (the anchor). :func:`anchor_region_stats` returns
both per query row; work and memory are ``O(S * region)``, never ``O(S^2)``. Reference:
:mod:`.naive` (each query block's region keys gathered, its logits written and reduced, a few
query blocks at a time); kernel: :mod:`.triton` (an online maximum and sum per row in
registers, one pass over the region keys), chosen by the dispatch rule of
:mod:`sparse_attn.ops._dispatch`.
"""

from __future__ import annotations

import torch

from .._dispatch import kernel_for
from .naive import AnchorStats, region_blocks, region_width
from .naive import anchor_region_stats as anchor_region_stats_reference

__all__ = ["AnchorStats", "anchor_region_stats", "region_blocks", "region_width"]


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
    positions; the region of a query block is KV blocks ``[0, sink_blocks)``, its own KV blocks
    and the ``local_blocks - 1`` before them (after them too when not causal); causally, keys
    after a row's position are masked. Only the rows of query blocks ``q_blocks`` (default:
    all) are computed. Float32 results ``(B, Hq, R)``; see :func:`.naive.anchor_region_stats`.
    """
    options = dict(
        block_q=block_q,
        block_k=block_k,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        scale=scale,
        causal=causal,
        q_blocks=q_blocks,
    )
    kernel = kernel_for(q, __package__, k=k)
    if kernel is not None:
        return AnchorStats(*kernel.anchor_region_stats_triton(q, k, **options))
    return anchor_region_stats_reference(q, k, **options)
