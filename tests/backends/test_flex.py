"""The FlexAttention backend's BlockMask, made from the plan."""

from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends import flex
from sparse_attn.plan import plan_for


@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_covers_exactly_the_pattern(causal):
    pattern = sa.random_pattern(heads=2, seq_q=50, seq_k=90, density=0.5, block_q=16, block_k=16, causal=causal, seed=5)
    block_mask = flex.block_mask(plan_for(pattern, causal=causal), num_q_heads=4)
    dense = block_mask.to_dense()  # (B, H, n_q, n_kv) incl. full and partial blocks
    expected = pattern.expand_heads(4).to_mask()
    assert torch.equal(dense.bool()[..., : pattern.num_q_blocks, : pattern.num_kv_blocks], expected)


@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_full_blocks_are_the_plans(causal):
    pattern = sa.random_pattern(
        batch=2, heads=3, seq_q=77, seq_k=100, density=0.6, block_q=16, block_k=16, causal=causal, seed=8
    )
    plan = plan_for(pattern, causal=causal)
    block_mask = flex.block_mask(plan)
    assert torch.equal(block_mask.full_kv_num_blocks, plan.full_counts)
    assert torch.equal(block_mask.kv_num_blocks, plan.partial_counts)
    for b, h, q_block in ((0, 0, 0), (1, 2, 4), (1, 1, pattern.num_q_blocks - 1)):
        count, full = int(pattern.kv_counts[b, h, q_block]), int(plan.full_counts[b, h, q_block])
        listed = pattern.kv_indices[b, h, q_block, :count].tolist()
        assert block_mask.full_kv_indices[b, h, q_block, :full].tolist() == listed[:full]
        assert block_mask.kv_indices[b, h, q_block, : count - full].tolist() == listed[full:]
