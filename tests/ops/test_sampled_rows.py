"""Sampled-row scoring operator: the Triton kernel against the reference, the cases it refuses, GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_kernel_values, random_qkv

from sparse_attn.geometry import num_blocks
from sparse_attn.ops.sampled_rows import sampled_rows_block_max_probs
from sparse_attn.ops.sampled_rows.naive import max_row_block_probs, sampled_query_rows
from sparse_attn.ops.sampled_rows.triton import sampled_rows_block_max_probs_triton, unsupported_reason


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, step, block_q, block_k, causal, dtype",
    [
        (1, 2, 2, 64, 64, 4, 16, 16, True, torch.float32),
        (2, 4, 2, 96, 130, 8, 32, 16, True, torch.float32),  # GQA, Sq < Sk, key tail
        (1, 2, 1, 48, 80, 4, 16, 32, False, torch.float32),
        (1, 1, 1, 2048, 2048, 16, 128, 16, True, torch.bfloat16),  # more KV blocks than the epilogue tile
    ],
)
def test_sampled_row_kernel_matches_max_row_block_probs(
    batch, q_heads, kv_heads, seq_q, seq_k, step, block_q, block_k, causal, dtype, quiet_numpy
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, dtype=dtype, seed=9)
    rows = sampled_query_rows(seq_q, block_q, step, "cpu")
    assert torch.equal(rows, torch.arange(step - 1, seq_q, step))
    q_rows = q[:, :, rows]
    expected = max_row_block_probs(
        q_rows.float(),
        rows + (seq_k - seq_q),
        k.float(),
        row_blocks=rows // block_q,
        n_q=num_blocks(seq_q, block_q),
        block_k=block_k,
        scale=0.25,
        causal=causal,
    )
    with quiet_numpy():
        got = sampled_rows_block_max_probs_triton(
            q_rows, k, seq_q=seq_q, query_step=step, block_q=block_q, block_k=block_k, scale=0.25, causal=causal
        )
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, expected, atol=tolerance)


@pytest.mark.gpu
def test_sampled_row_kernel_matches_reference_on_gpu():
    seq, step = 8192, 16
    q, k, _ = random_qkv(1, 8, 8, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=10)
    rows = sampled_query_rows(seq, 128, step, "cuda")
    expected = max_row_block_probs(
        q[:, :, rows], rows, k, row_blocks=rows // 128, n_q=seq // 128, block_k=128, scale=128**-0.5, causal=True
    )
    got = sampled_rows_block_max_probs_triton(
        q[:, :, rows], k, seq_q=seq, query_step=step, block_q=128, block_k=128, scale=128**-0.5, causal=True
    )
    assert torch.allclose(got, expected, atol=2e-3)


def test_sampled_row_kernel_refuses_irregular_rows():
    q_rows = torch.zeros(1, 1, 7, 16)
    reason = unsupported_reason(q_rows, seq_q=100, query_step=16, block_q=64, block_k=64)
    assert reason is not None and "every 16-th query" in reason


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, step, block_q, block_k, causal",
    [
        (2, 4, 2, 96, 130, 8, 32, 16, True),
        (1, 2, 1, 48, 80, 4, 16, 32, False),
        (1, 2, 2, 100, 100, 4, 16, 16, True),
    ],
)
def test_sampled_rows_query_block_ranges_are_rows_of_the_whole(
    batch, q_heads, kv_heads, seq_q, seq_k, step, block_q, block_k, causal, quiet_numpy
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, seed=9)
    rows = sampled_query_rows(seq_q, block_q, step, "cpu")
    q_rows = q[:, :, rows]
    geometry = dict(seq_q=seq_q, query_step=step, block_q=block_q, block_k=block_k, scale=0.25, causal=causal)
    whole = sampled_rows_block_max_probs(q_rows, k, rows=rows, **geometry)
    n_q = num_blocks(seq_q, block_q)
    kernel_runs = seq_q % step == 0
    with quiet_numpy():
        whole_kernel = sampled_rows_block_max_probs_triton(q_rows, k, **geometry) if kernel_runs else None
        for start, stop in [(0, 1), (1, n_q), (n_q - 1, n_q)]:
            part = sampled_rows_block_max_probs(q_rows, k, rows=rows, **geometry, q_blocks=range(start, stop))
            assert torch.allclose(part, whole[:, :, start:stop], atol=1e-6)
            if kernel_runs:
                kernel = sampled_rows_block_max_probs_triton(q_rows, k, **geometry, q_blocks=range(start, stop))
                assert_same_kernel_values(kernel, whole_kernel[:, :, start:stop])
