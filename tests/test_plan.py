"""The plan: full vs partial blocks, the work order, the transposed lists, and its cache on the pattern."""

from __future__ import annotations

import pytest
import torch
from helpers import token_mask

import sparse_attn as sa
from sparse_attn.geometry import fully_visible_block_mask
from sparse_attn.plan import plan_for

# (batch, pattern heads, seq_q, seq_k, block_q, block_k): batch > 1, per-query-head (6) and
# per-KV-head (2) patterns, Sq < Sk, odd lengths, blocks of different sizes.
CASES = [
    (2, 6, 77, 77, 16, 16),
    (3, 2, 50, 131, 16, 32),
    (2, 6, 129, 257, 64, 32),
    (1, 1, 33, 33, 32, 16),
]


def _random(case, density, causal, seed):
    batch, heads, seq_q, seq_k, block_q, block_k = case
    return sa.random_pattern(
        batch=batch,
        heads=heads,
        seq_q=seq_q,
        seq_k=seq_k,
        density=density,
        seed=seed,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
    )


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_transposed_lists_match_the_block_mask(case, causal, seed):
    pattern = _random(case, 0.4, causal, seed)
    lists = plan_for(pattern, causal=causal).transposed
    mask = pattern.to_mask()  # (B, H, n_q, n_kv)
    batch, heads = pattern.batch, pattern.num_heads
    assert lists.q_counts.dtype == torch.int32 and lists.q_indices.dtype == torch.int32
    assert lists.q_counts.shape == (batch, heads, pattern.num_kv_blocks)
    assert torch.equal(lists.q_counts, mask.sum(2, dtype=torch.int32))
    for b in range(batch):
        for h in range(heads):
            for kv_block in range(pattern.num_kv_blocks):
                expected = mask[b, h, :, kv_block].nonzero().flatten().tolist()  # ascending
                count = int(lists.q_counts[b, h, kv_block])
                assert lists.q_indices[b, h, kv_block, :count].tolist() == expected
                assert not lists.q_indices[b, h, kv_block, count:].any()  # padding is zero


def test_transposed_lists_are_built_lazily_once():
    pattern = _random(CASES[0], 0.3, True, 3)
    plan = plan_for(pattern, causal=True)
    assert "transposed" not in vars(plan)
    assert plan.transposed is plan.transposed


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_full_counts_follow_the_full_block_rule(case, causal):
    pattern = _random(case, 0.6, causal, 4)
    plan = plan_for(pattern, causal=causal)
    table = fully_visible_block_mask(pattern.seq_q, pattern.seq_k, pattern.block_q, pattern.block_k, causal=causal)
    assert plan.full_counts.dtype == torch.int32 and plan.full_counts.shape == pattern.kv_counts.shape
    assert torch.equal(plan.partial_counts, pattern.kv_counts - plan.full_counts)
    for b in range(pattern.batch):
        for h in range(pattern.num_heads):
            for q_block in range(pattern.num_q_blocks):
                listed = pattern.kv_indices[b, h, q_block, : int(pattern.kv_counts[b, h, q_block])]
                full = table[q_block, listed.long()]
                count = int(plan.full_counts[b, h, q_block])
                # The full entries lead each list (the kernels compute them first, unmasked).
                assert full.tolist() == [True] * count + [False] * (len(listed) - count)


@pytest.mark.parametrize("causal", [True, False])
def test_full_blocks_are_seen_whole_by_every_query(causal):
    # Token level: in a full block every (query, key) pair is visible; in a partial one not all.
    pattern = sa.dense_pattern(seq_q=70, seq_k=90, block_q=16, block_k=16, causal=causal)
    plan = plan_for(pattern, causal=causal)
    visible = token_mask(pattern, batch=1, q_heads=1, causal=causal)[0, 0]
    for q_block in range(pattern.num_q_blocks):
        rows = slice(q_block * 16, min((q_block + 1) * 16, 70))
        count = int(pattern.kv_counts[0, 0, q_block])
        for slot, kv_block in enumerate(pattern.kv_indices[0, 0, q_block, :count].tolist()):
            keys = visible[rows, kv_block * 16 : (kv_block + 1) * 16]
            whole = keys.shape[1] == 16 and bool(keys.all())
            assert whole == (slot < int(plan.full_counts[0, 0, q_block]))


def test_work_order_puts_the_heaviest_query_blocks_first():
    causal = sa.dense_pattern(batch=2, heads=3, seq_q=100, block_q=16, block_k=16)
    order = plan_for(causal, causal=True).work_order
    assert order.dtype == torch.int32
    assert order.tolist() == list(range(causal.num_q_blocks - 1, -1, -1))  # causal rows grow with position
    mask = torch.eye(4, dtype=torch.bool).repeat(1, 2, 1, 1)
    mask[0, 0, 1] = True  # query block 1 keeps every block in head 0
    mask[0, 1, 2, :2] = True
    pattern = sa.BlockSparsePattern.from_mask(mask, block_q=16, block_k=16, seq_q=64, seq_k=64, causal=False)
    # kept blocks per query block, summed over heads: [2, 5, 4, 2]; ties go to the later block.
    assert plan_for(pattern, causal=False).work_order.tolist() == [1, 2, 3, 0]


def test_work_bucket_is_the_log2_of_the_mean_kept_blocks():
    dense = sa.dense_pattern(seq_q=4096)  # 16.5 kept blocks per query block on average
    assert plan_for(dense, causal=True).work_bucket == 5
    assert plan_for(sa.dense_pattern(seq_q=2048), causal=True).work_bucket == 4
    assert plan_for(sa.dense_pattern(seq_q=128), causal=True).work_bucket == 1


def test_plan_is_cached_per_pattern_and_mode_and_dropped_with_new_tensors():
    pattern = _random(CASES[1], 0.5, False, 5)
    plan = plan_for(pattern, causal=True)
    assert plan_for(pattern, causal=True) is plan
    assert plan_for(pattern, causal=False) is not plan and plan_for(pattern, causal=False).causal is False
    assert plan_for(pattern.to("cpu"), causal=True) is not plan


@pytest.mark.parametrize("size, bins", [(0, 3), (1, 1), (1000, 7), (4097, 4096)])
def test_bin_counts_equal_bincount(size, bins):
    """The plans' sync-free counts (``utils.bin_counts``) equal ``torch.bincount`` with ``minlength``."""
    from sparse_attn.utils import bin_counts

    values = torch.randint(0, bins, (size,), generator=torch.Generator().manual_seed(size))
    assert torch.equal(bin_counts(values, bins), torch.bincount(values, minlength=bins))
    assert torch.equal(bin_counts(values.view(-1, 1).int(), bins), torch.bincount(values, minlength=bins))
