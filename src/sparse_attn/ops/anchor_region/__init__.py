"""Anchor-region statistics: exact logits of each query row over its sink and local key blocks, reduced.

SALE and AnchorAttention both compute attention exactly over the region every head attends
to most (the first key blocks, the sinks, and the blocks around the diagonal) and judge every
other key against it: SALE against the region's softmax denominator (its log-sum-exp),
AnchorAttention against its largest score (the anchor). :func:`anchor_region_stats` returns
both per query row. The region's keys are gathered per query block (a few blocks of keys each),
so the work and memory are ``O(S * region)``, never ``O(S^2)``. No fused kernel: the PyTorch
code in :mod:`.naive` is the implementation and the entry point.
"""

from .naive import AnchorStats, anchor_region_stats, region_blocks, region_width

__all__ = ["AnchorStats", "anchor_region_stats", "region_blocks", "region_width"]
