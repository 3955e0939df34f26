"""Pooling operator: mean-pooled blocks against brute force."""

from __future__ import annotations

import torch

from sparse_attn.ops.pooling import mean_pool_blocks


def test_mean_pool_blocks_averages_real_positions_only():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    pooled = mean_pool_blocks(x, 4)
    assert torch.allclose(pooled.flatten(), torch.tensor([1.5, 5.5, 8.5]))
