"""Pooling operator: mean-pooled blocks against brute force; pooled logits per chunk of query blocks and heads."""

from __future__ import annotations

import torch
from helpers import random_qkv

from sparse_attn.geometry import causal_block_mask
from sparse_attn.ops.gqa import head_chunks
from sparse_attn.ops.pooling import PooledBlocks, mean_pool_blocks


def test_mean_pool_blocks_averages_real_positions_only():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    pooled = mean_pool_blocks(x, 4)
    assert torch.allclose(pooled.flatten(), torch.tensor([1.5, 5.5, 8.5]))


def test_pooled_logits_of_chunks_are_parts_of_the_whole():
    q, k, _ = random_qkv(2, 6, 2, 70, 100, 16, seed=3)
    pooled = PooledBlocks.of(q, k, block_q=16, block_k=16)
    whole = pooled.logits(scale=0.25, causal=True)
    # Brute force: pool, expand K over its group, multiply; future blocks at -inf.
    expected = mean_pool_blocks(q, 16) @ mean_pool_blocks(k, 16).repeat_interleave(3, 1).transpose(-1, -2) * 0.25
    expected = expected.masked_fill(~causal_block_mask(70, 100, 16, 16), float("-inf"))
    assert torch.allclose(whole, expected, atol=1e-6)
    for start, stop in [(0, 1), (2, 5), (4, 5)]:
        part = pooled.logits(scale=0.25, causal=True, q_blocks=range(start, stop))
        assert torch.allclose(part, whole[:, :, start:stop], atol=1e-6)
    picked = pooled.logits(scale=0.25, causal=True, q_blocks=(4, 0, 2), heads=range(3, 6))
    assert torch.allclose(picked, whole[:, 3:6, [4, 0, 2]], atol=1e-6)
    for heads_per_chunk in (1, 2, 3, 6):
        for heads in head_chunks(6, 3, heads_per_chunk):
            part = pooled.logits(scale=0.25, causal=True, heads=heads)
            assert torch.allclose(part, whole[:, heads.start : heads.stop], atol=1e-6)
