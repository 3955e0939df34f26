"""The block max-pooled, row-normalised attention map (SeerAttention's target) against the dense map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_qkv

from sparse_attn.ops.pooled_attention_map import naive, pooled_attention_map

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k): odd lengths, GQA 1-8,
# 12/4 and 6/3 heads, batch > 1, Sq < Sk, partial last blocks, block_q != block_k.
SHAPES = [
    (1, 4, 4, 37, 37, 16, 8, 8),
    (2, 12, 4, 29, 45, 64, 7, 5),
    (2, 8, 1, 33, 33, 32, 5, 5),
    (1, 6, 3, 1, 23, 128, 4, 4),
    (3, 2, 2, 19, 50, 16, 16, 3),
]


def dense_pooled_map(q, k, block_q, block_k, scale, causal):
    """The paper's rule on the full (Sq, Sk) attention map, in float64."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    logits = q @ k.transpose(-1, -2) * scale
    if causal:
        positions = torch.arange(seq_q) + seq_k - seq_q
        logits = logits.masked_fill(torch.arange(seq_k)[None, :] > positions[:, None], float("-inf"))
    probs = logits.softmax(-1)
    n_q, n_kv = -(-seq_q // block_q), -(-seq_k // block_k)
    probs = F.pad(probs, (0, n_kv * block_k - seq_k, 0, n_q * block_q - seq_q))
    pooled = probs.view(*probs.shape[:2], n_q, block_q, n_kv, block_k).amax(dim=(3, 5))
    return pooled / pooled.sum(-1, keepdim=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_dense_map(shape, causal):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim)
    scale = dim**-0.5
    out = pooled_attention_map(q, k, block_q=block_q, block_k=block_k, scale=scale, causal=causal)
    expected = dense_pooled_map(q, k, block_q, block_k, scale, causal)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out[..., 0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_score_in_float32(dtype):
    q, k, _ = random_qkv(2, 6, 3, 40, 52, 64, dtype=dtype, seed=3)
    out = pooled_attention_map(q, k, block_q=8, block_k=8, scale=0.125)
    torch.testing.assert_close(out.double(), dense_pooled_map(q, k, 8, 8, 0.125, True), rtol=1e-4, atol=1e-6)


def test_chunked_and_ranged_rows_equal_the_whole(monkeypatch):
    q, k, _ = random_qkv(1, 4, 2, 45, 61, 16, seed=5)
    whole = pooled_attention_map(q, k, block_q=4, block_k=6, scale=0.25)
    monkeypatch.setattr(naive, "CHUNK_ELEMENTS", 1)  # one query block per chunk
    torch.testing.assert_close(pooled_attention_map(q, k, block_q=4, block_k=6, scale=0.25), whole)
    part = pooled_attention_map(q, k, block_q=4, block_k=6, scale=0.25, q_blocks=range(3, 9))
    torch.testing.assert_close(part, whole[:, :, 3:9])


def test_blocks_no_query_sees_get_zero():
    q, k, _ = random_qkv(1, 2, 1, 32, 32, 16, seed=7)
    out = pooled_attention_map(q, k, block_q=8, block_k=8, scale=0.25)
    assert torch.equal(out > 0, torch.ones(4, 4, dtype=torch.bool).tril().expand_as(out))


# Kernel cases (block sizes 16-128): GQA 1-4, 6/3 heads, head_dim not a power of two, Sq < Sk,
# partial last blocks, block_q != block_k.
KERNEL_SHAPES = [
    (1, 4, 2, 40, 57, 16, 16, 16),
    (2, 6, 3, 33, 33, 64, 16, 32),
    (1, 4, 1, 50, 70, 24, 32, 16),
]


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_reference(shape, causal, dtype, poison_outputs):
    from sparse_attn.ops.pooled_attention_map.triton import pooled_attention_map_triton

    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype)
    options = dict(block_q=block_q, block_k=block_k, scale=dim**-0.5, causal=causal)
    out = pooled_attention_map_triton(q, k, **options)
    torch.testing.assert_close(out, naive.pooled_attention_map(q, k, **options), rtol=1e-4, atol=1e-6)
    part = pooled_attention_map_triton(q, k, **options, q_blocks=range(1, 2))
    torch.testing.assert_close(part, out[:, :, 1:2])


def test_kernel_reads_transposed_inputs(poison_outputs):
    """(B, S, H, D) storage seen as (B, H, S, D), as transformers passes q and k."""
    from sparse_attn.ops.pooled_attention_map.triton import pooled_attention_map_triton

    q, k, _ = random_qkv(2, 4, 2, 37, 45, 32, seed=2, transposed=True)
    options = dict(block_q=16, block_k=16, scale=0.2)
    expected = naive.pooled_attention_map(q.contiguous(), k.contiguous(), **options)
    torch.testing.assert_close(pooled_attention_map_triton(q, k, **options), expected, rtol=1e-4, atol=1e-6)


def test_kernel_refuses_what_it_cannot_run():
    from sparse_attn.ops.pooled_attention_map import triton as kernel

    q = torch.zeros(1, 1, 8, 16)
    assert "block_q and block_k" in kernel.unsupported_reason(q, block_q=8, block_k=16)
    with pytest.raises(ValueError, match="pooled-map kernel cannot run"):
        kernel.pooled_attention_map_triton(q, q, block_q=12, block_k=16, scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_gpu_at_smollm2_shape(dtype, poison_outputs):
    """SmolLM2's shape (9/3 heads, head_dim 64) at 8K with 64-token blocks: the dispatched kernel
    (outputs poisoned) against the reference, both on the GPU. Estimate: about a second plus
    compilation (the reference is 0.6G float32 logits in 2^26-element chunks; 20 s on 2 CPU cores)."""
    q, k, _ = random_qkv(1, 9, 3, 8192, 8192, 64, dtype=dtype, device="cuda", seed=0)
    options = dict(block_q=64, block_k=64, scale=0.125)
    out = pooled_attention_map(q, k, **options)
    torch.testing.assert_close(out, naive.pooled_attention_map(q, k, **options), rtol=1e-3, atol=1e-6)
    tail = pooled_attention_map(q[:, :, -1000:], k, **options)  # Sq < Sk, partial last query block
    torch.testing.assert_close(tail, naive.pooled_attention_map(q[:, :, -1000:], k, **options), rtol=1e-3, atol=1e-6)
