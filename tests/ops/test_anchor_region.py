"""Anchor-region statistics against a dense brute force of the region's keys per query row."""

from __future__ import annotations

import pytest
import torch
from helpers import random_qkv

from sparse_attn.geometry import num_blocks
from sparse_attn.ops.anchor_region import anchor_region_stats, region_width
from sparse_attn.ops.anchor_region import naive as anchor_region_naive
from sparse_attn.ops.static_masks import sink_local_block_mask


def brute_force(q, k, block_q, block_k, sink_blocks, local_blocks, scale, causal):
    seq_q, seq_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    blocks = sink_local_block_mask(
        seq_q, seq_k, block_q, block_k, sink_blocks=sink_blocks, local_blocks=local_blocks, causal=causal
    )
    keys = blocks.repeat_interleave(block_q, 0).repeat_interleave(block_k, 1)[:seq_q, :seq_k]
    if causal:
        keys = keys & (torch.arange(seq_k)[None, :] <= (torch.arange(seq_q) + seq_k - seq_q)[:, None])
    logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~keys, float("-inf"))
    return logits.amax(-1), torch.logsumexp(logits, -1)


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, block_q, block_k, sink_blocks, local_blocks",
    [
        (2, 4, 1, 45, 45, 8, 8, 1, 2),
        (1, 12, 4, 30, 71, 16, 8, 2, 3),
        (1, 6, 3, 33, 33, 8, 16, 1, 1),
        (2, 2, 2, 17, 40, 4, 4, 3, 5),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_region_stats_match_brute_force(
    batch, q_heads, kv_heads, seq_q, seq_k, block_q, block_k, sink_blocks, local_blocks, causal, monkeypatch
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, seed=seq_q)
    region = dict(block_q=block_q, block_k=block_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    expected_max, expected_lse = brute_force(q, k, **region, scale=0.3, causal=causal)
    stats = anchor_region_stats(q, k, **region, scale=0.3, causal=causal)
    assert torch.allclose(stats.row_max, expected_max.float(), atol=1e-5)
    assert torch.allclose(stats.row_lse, expected_lse.float(), atol=1e-5)
    # Any range of query blocks gives those rows.
    n_q = num_blocks(seq_q, block_q)
    part = anchor_region_stats(q, k, **region, scale=0.3, causal=causal, q_blocks=range(1, n_q))
    assert torch.allclose(part.row_lse, stats.row_lse[:, :, block_q:], atol=1e-6)
    # One query block per step of the internal loop gives the same rows.
    monkeypatch.setattr(anchor_region_naive, "CHUNK_ELEMENTS", 1)
    chunked = anchor_region_stats(q, k, **region, scale=0.3, causal=causal)
    assert torch.allclose(chunked.row_max, stats.row_max) and torch.allclose(chunked.row_lse, stats.row_lse)


def test_region_width_bounds_the_gathered_keys():
    # Sinks, the window before the own blocks and (non-causal) after, and the own span.
    assert region_width(128, 128, 1, 1) >= 128 * 3
    assert region_width(16, 8, 2, 3) >= 8 * (2 + 2 * 3 - 1 + 3)


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k, sink_blocks, local_blocks, dtype, causal",
    [
        (2, 6, 2, 77, 130, 16, 16, 16, 1, 2, torch.float32, True),  # Sq < Sk, GQA 3, odd lengths
        (1, 4, 4, 45, 45, 32, 8, 16, 2, 1, torch.float32, False),
        (1, 8, 1, 70, 100, 64, 32, 8, 3, 3, torch.float16, True),  # GQA 8, a window wider than one step
        (1, 8, 1, 70, 100, 64, 32, 8, 3, 3, torch.float16, False),  # the window after the own blocks too
    ],
)
def test_kernel_matches_reference(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k, sink_blocks, local_blocks, dtype, causal, monkeypatch
):
    from sparse_attn.ops.anchor_region import triton as anchor_region_triton

    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seq_q + dim)
    q, k = q.to(dtype), k.to(dtype)
    region = dict(block_q=block_q, block_k=block_k, sink_blocks=sink_blocks, local_blocks=local_blocks)
    monkeypatch.setattr(anchor_region_triton, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    n_q = num_blocks(seq_q, block_q)
    for blocks in (None, range(1, n_q)):
        expected = anchor_region_naive.anchor_region_stats(q, k, **region, scale=0.3, causal=causal, q_blocks=blocks)
        row_max, row_lse = anchor_region_triton.anchor_region_stats_triton(
            q, k, **region, scale=0.3, causal=causal, q_blocks=blocks
        )
        assert not row_max.isnan().any() and not row_lse.isnan().any()
        assert torch.allclose(row_max, expected.row_max, rtol=1e-5, atol=1e-5)
        assert torch.allclose(row_lse, expected.row_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_kernel_matches_reference_on_gpu():
    from sparse_attn.ops.anchor_region import triton as anchor_region_triton

    q, k, _ = random_qkv(1, 32, 8, 8192, 8192, 128, dtype=torch.bfloat16, device="cuda", seed=3)
    region = dict(block_q=128, block_k=128, sink_blocks=1, local_blocks=1)
    expected = anchor_region_naive.anchor_region_stats(q, k, **region, scale=128**-0.5, causal=True)
    row_max, row_lse = anchor_region_triton.anchor_region_stats_triton(q, k, **region, scale=128**-0.5, causal=True)
    assert torch.allclose(row_max, expected.row_max, rtol=1e-4, atol=1e-4)
    assert torch.allclose(row_lse, expected.row_lse, rtol=1e-4, atol=1e-4)
