"""Antidiagonal scoring operator (and the scoring kernel's launch): reference and Triton kernel against
brute force, head and query-cell chunking, GPU against the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_kernel_values, random_qkv

import sparse_attn as sa
from sparse_attn.geometry import causal_block_mask, num_blocks
from sparse_attn.ops.antidiagonal import triton as antidiagonal_triton
from sparse_attn.ops.antidiagonal.naive import (
    antidiagonal_block_probs_reference,
    antidiagonal_visibility,
    cells_to_block_probs,
    fp8_keys,
)
from sparse_attn.ops.antidiagonal.triton import antidiagonal_block_probs_triton
from sparse_attn.ops.sampled_rows.triton import sampled_rows_block_max_probs_triton


def _brute_force_antidiagonal(q, k, stride, block_q, block_k, scale, causal):
    """XAttention's block probabilities from explicit antidiagonal sums, one cell pair at a time."""
    batch, q_heads, seq_q, dim = q.shape
    group = q_heads // k.shape[1]
    q_cells, k_cells = num_blocks(seq_q, stride), num_blocks(k.shape[2], stride)
    qp = torch.nn.functional.pad(q.double(), (0, 0, 0, q_cells * stride - seq_q))
    kp = torch.nn.functional.pad(k.double(), (0, 0, 0, k_cells * stride - k.shape[2]))
    sums = torch.zeros(batch, q_heads, q_cells, k_cells, dtype=torch.float64)
    for i in range(stride):
        sums += qp[:, :, stride - 1 - i :: stride] @ kp[:, :, i::stride].repeat_interleave(group, 1).transpose(-1, -2)
    last_query, first_key = antidiagonal_visibility(seq_q, k.shape[2], stride, causal=causal, device="cpu")
    logits = (sums * scale / stride).masked_fill(first_key[None, :] > last_query[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    n_kv = num_blocks(k.shape[2], block_k)
    per_block = torch.nn.functional.pad(probs, (0, n_kv * (block_k // stride) - k_cells))
    per_block = per_block.view(batch, q_heads, q_cells, n_kv, -1).sum(-1)
    return cells_to_block_probs(per_block, block_q // stride).float()


ANTIDIAGONAL_CASES = [
    # batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype
    pytest.param(1, 4, 2, 100, 130, 16, 4, 16, 32, True, torch.float32, id="gqa-chunked-tails"),
    pytest.param(2, 2, 1, 64, 64, 32, 8, 32, 32, True, torch.bfloat16, id="bf16-batch2"),
    pytest.param(1, 2, 2, 50, 77, 16, 4, 16, 16, False, torch.float32, id="non-causal"),
    pytest.param(1, 2, 1, 96, 96, 16, 8, 64, 16, True, torch.float32, id="large-q-block"),
    pytest.param(1, 1, 1, 1100, 1100, 16, 8, 32, 16, True, torch.float32, id="more-kv-blocks-than-epilogue-tile"),
]


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype", ANTIDIAGONAL_CASES
)
def test_antidiagonal_reference_and_triton_match_brute_force(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype, quiet_numpy
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype, seed=5)
    scale = dim**-0.5
    expected = _brute_force_antidiagonal(q.float(), k.float(), stride, block_q, block_k, scale, causal)
    options = dict(stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal)
    reference = antidiagonal_block_probs_reference(q, k, **options)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(reference, expected, atol=tolerance)
    with quiet_numpy():
        triton_probs = antidiagonal_block_probs_triton(q, k, **options)
    assert torch.allclose(triton_probs, expected, atol=tolerance)


def test_scoring_kernel_in_query_cell_chunks_matches_one_launch(monkeypatch, quiet_numpy):
    # Very long sequences split one head's query cells over several launches; forced here
    # with a tiny scratch budget and chunk unit.
    q, k, _ = random_qkv(2, 2, 1, 200, 232, 16, dtype=torch.float32, seed=13)
    antidiagonal = dict(stride=4, block_q=16, block_k=16, scale=0.25, causal=True)
    sampled = dict(seq_q=200, query_step=4, block_q=16, block_k=16, scale=0.25, causal=True)
    q_rows = q[:, :, 3::4]
    with quiet_numpy():
        whole = antidiagonal_block_probs_triton(q, k, **antidiagonal)
        whole_sampled = sampled_rows_block_max_probs_triton(q_rows, k, **sampled)
        monkeypatch.setattr(antidiagonal_triton, "SCRATCH_CHUNKS", 1)
        monkeypatch.setattr(antidiagonal_triton, "CHUNK_ELEMENTS", 400)
        monkeypatch.setattr(antidiagonal_triton, "_CELL_UNIT", 32)
        chunked = antidiagonal_block_probs_triton(q, k, **antidiagonal)
        chunked_sampled = sampled_rows_block_max_probs_triton(q_rows, k, **sampled)
    assert torch.equal(chunked, whole)
    assert torch.equal(chunked_sampled, whole_sampled)


def test_antidiagonal_triton_in_head_chunks_matches_one_chunk(monkeypatch, quiet_numpy):
    q, k, _ = random_qkv(2, 4, 2, 70, 90, 16, dtype=torch.float32, seed=8)
    options = dict(stride=4, block_q=16, block_k=16, scale=0.25, causal=True)
    with quiet_numpy():
        whole = antidiagonal_block_probs_triton(q, k, **options)
        monkeypatch.setattr(antidiagonal_triton, "SCRATCH_CHUNKS", 1)
        monkeypatch.setattr(antidiagonal_triton, "CHUNK_ELEMENTS", 2 * 18 * 6 * 3)  # three heads, then one
        chunked = antidiagonal_block_probs_triton(q, k, **options)
    assert torch.equal(chunked, whole)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [4096, 16384])
def test_antidiagonal_triton_matches_reference_on_gpu(seq):
    q, k, _ = random_qkv(1, 8, 2, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=6)
    options = dict(stride=8, block_q=128, block_k=128, scale=128**-0.5, causal=True)
    reference = antidiagonal_block_probs_reference(q, k, **options)
    triton_probs = antidiagonal_block_probs_triton(q, k, **options)
    assert torch.allclose(triton_probs, reference, atol=2e-3)
    valid = causal_block_mask(seq, seq, 128, 128, "cuda")
    assert torch.allclose(triton_probs.sum(-1), torch.ones_like(triton_probs[..., 0]), atol=1e-3)
    assert bool((triton_probs[..., ~valid] == 0).all())


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, stride, block_q, block_k, causal",
    [(1, 4, 2, 100, 130, 4, 16, 32, True), (2, 2, 1, 64, 64, 8, 32, 32, True), (1, 2, 2, 50, 77, 4, 16, 16, False)],
)
def test_antidiagonal_query_block_ranges_are_rows_of_the_whole(
    batch, q_heads, kv_heads, seq_q, seq_k, stride, block_q, block_k, causal, quiet_numpy
):
    # What an estimator streaming over chunks of query blocks asks for: the kernel scores only the
    # range's cells, bit for bit the rows of the whole table; the reference to float rounding (its
    # matmuls take other shapes).
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, dtype=torch.float32, seed=5)
    options = dict(stride=stride, block_q=block_q, block_k=block_k, scale=0.25, causal=causal)
    n_q = num_blocks(seq_q, block_q)
    with quiet_numpy():
        whole_kernel = antidiagonal_block_probs_triton(q, k, **options)
        whole_reference = antidiagonal_block_probs_reference(q, k, **options)
        for start, stop in {(0, 1), (1, n_q), (n_q - 1, n_q), (1, max(2, n_q - 1))}:
            rows = range(start, stop)
            kernel = antidiagonal_block_probs_triton(q, k, **options, q_blocks=rows)
            reference = antidiagonal_block_probs_reference(q, k, **options, q_blocks=rows)
            assert_same_kernel_values(kernel, whole_kernel[:, :, start:stop])
            assert torch.allclose(reference, whole_reference[:, :, start:stop], atol=1e-6)


def test_scoring_kernel_range_in_query_cell_chunks_matches_one_launch(monkeypatch, quiet_numpy):
    # A query-block range that starts mid-sequence, split over several launches by a tiny scratch budget.
    q, k, _ = random_qkv(1, 2, 1, 200, 232, 16, dtype=torch.float32, seed=14)
    options = dict(stride=4, block_q=16, block_k=16, scale=0.25, causal=True, q_blocks=range(3, 13))
    with quiet_numpy():
        whole = antidiagonal_block_probs_triton(q, k, **options)
        monkeypatch.setattr(antidiagonal_triton, "SCRATCH_CHUNKS", 1)
        monkeypatch.setattr(antidiagonal_triton, "CHUNK_ELEMENTS", 400)
        monkeypatch.setattr(antidiagonal_triton, "_CELL_UNIT", 32)
        chunked = antidiagonal_block_probs_triton(q, k, **options)
    assert torch.equal(chunked, whole)


# TMA loads (loads="tma"): tensor descriptors over whole cells ------------------------------------
TMA_CASES = [
    # batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, q_blocks, precision
    pytest.param(2, 6, 2, 64, 96, 32, 8, 32, 32, True, None, "input", id="gqa3-batch2-sq<sk"),
    pytest.param(1, 4, 1, 120, 120, 16, 4, 16, 16, False, range(2, 6), "input", id="gqa4-range-non-causal"),
    pytest.param(1, 4, 2, 96, 128, 16, 4, 16, 32, True, range(1, 5), "fp8", id="fp8-range"),
]


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, q_blocks, precision", TMA_CASES
)
def test_tma_loads_match_pointer_loads_and_brute_force(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, q_blocks, precision, quiet_numpy
):
    # Queries in the (B, S, H, D) layout models produce (rows strided by H * D), keys contiguous.
    q = torch.randn(batch, seq_q, q_heads, dim, generator=torch.Generator().manual_seed(31)).to(torch.bfloat16)
    q = q.transpose(1, 2)
    _, k, _ = random_qkv(batch, kv_heads, kv_heads, seq_k, seq_k, dim, dtype=torch.bfloat16, seed=32)
    options = dict(stride=stride, block_q=block_q, block_k=block_k, scale=dim**-0.5, causal=causal, q_blocks=q_blocks)
    options["score_precision"] = precision
    with quiet_numpy():
        pointers = antidiagonal_block_probs_triton(q, k, **options, loads="pointers")
        tma = antidiagonal_block_probs_triton(q, k, **options, loads="tma")
    assert torch.equal(tma, pointers)  # the same products in the same order
    if precision == "fp8":
        reference = antidiagonal_block_probs_reference(q, k, **options)
        assert torch.allclose(tma, reference, atol=1e-5)
    else:
        expected = _brute_force_antidiagonal(q.float(), k.float(), stride, block_q, block_k, dim**-0.5, causal)
        rows = slice(None) if q_blocks is None else slice(q_blocks.start, q_blocks.stop)
        assert torch.allclose(tma, expected[:, :, rows], atol=1e-5)


def test_tma_loads_are_checked():
    q, k, _ = random_qkv(1, 2, 1, 100, 96, 16, dtype=torch.bfloat16, seed=33)
    options = dict(stride=8, block_q=16, block_k=16, scale=0.25, causal=True)
    with pytest.raises(ValueError, match=r"loads='tma'.*whole cells of 8"):
        antidiagonal_block_probs_triton(q, k, **options, loads="tma")
    with pytest.raises(ValueError, match="loads must be None or one of"):
        antidiagonal_block_probs_triton(q[:, :, :96], k, **options, loads="async")
    with pytest.raises(ValueError, match="float32 inputs"):
        antidiagonal_block_probs_triton(q[:, :, :96].float(), k.float(), **options, loads="tma")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["input", "fp8"])
def test_tma_loads_match_pointer_loads_on_gpu(precision):
    q, k, _ = random_qkv(1, 8, 2, 16384, 16384, 128, dtype=torch.bfloat16, device="cuda", seed=34)
    options = dict(stride=8, block_q=128, block_k=128, scale=128**-0.5, causal=True, score_precision=precision)
    reference = antidiagonal_block_probs_reference(q, k, **options)
    pointers = antidiagonal_block_probs_triton(q, k, **options, loads="pointers")
    tma = antidiagonal_block_probs_triton(q, k, **options, loads="tma")
    assert torch.allclose(tma, reference, atol=2e-3)
    assert torch.allclose(tma, pointers, atol=1e-4)


# fp8 scoring (score_precision="fp8") ---------------------------------------------------------
FP8_CASES = [
    # batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype, q_blocks
    pytest.param(1, 4, 2, 100, 130, 16, 4, 16, 32, True, torch.float32, None, id="gqa-tails"),
    pytest.param(2, 2, 1, 64, 64, 32, 8, 32, 32, True, torch.bfloat16, None, id="bf16-batch2"),
    pytest.param(1, 3, 3, 50, 77, 16, 4, 16, 16, False, torch.float32, None, id="non-causal-3-heads"),
    pytest.param(1, 4, 1, 200, 232, 16, 4, 16, 16, True, torch.float32, range(3, 9), id="gqa4-range"),
]


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype, q_blocks", FP8_CASES
)
def test_fp8_scoring_kernel_matches_the_emulating_reference(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype, q_blocks, quiet_numpy
):
    # The kernel's products of e4m3 codes are exact in float32, as the reference's dequantised
    # codes are: only the summation order differs.
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype, seed=21)
    k = k + 3.0  # a shared key offset: the centring must take it out
    options = dict(stride=stride, block_q=block_q, block_k=block_k, scale=dim**-0.5, causal=causal, q_blocks=q_blocks)
    reference = antidiagonal_block_probs_reference(q, k, **options, score_precision="fp8")
    with quiet_numpy():
        kernel = antidiagonal_block_probs_triton(q, k, **options, score_precision="fp8")
        with_keys = antidiagonal_block_probs_triton(q, k, **options, score_precision="fp8", keys_fp8=fp8_keys(k))
    assert torch.allclose(kernel, reference, atol=1e-5)
    assert torch.equal(with_keys, kernel)
    # Close to the exact scoring (3 mantissa bits per operand), not equal to it. A last partial key
    # cell is padded with zeros in centred space (the key mean), not with zero keys: its KV block
    # is left out of the comparison.
    exact = antidiagonal_block_probs_reference(q, k, **options)
    compared = slice(None) if seq_k % stride == 0 else slice(0, -1)
    assert float((reference - exact)[..., compared].abs().max()) < 0.05
    assert not torch.equal(reference, exact)


def test_fp8_keys_are_centred_per_head_codes_and_centring_leaves_scores_unchanged():
    q, k, _ = random_qkv(2, 4, 2, 96, 96, 16, dtype=torch.float32, seed=22)
    keys = fp8_keys(k + torch.randn(1, 2, 1, 16))
    assert keys.codes.dtype == torch.float8_e4m3fn and keys.scale.shape == (2, 2)
    assert float(keys.codes.float().abs().amax()) == 448.0  # each head's largest entry is the top code
    centred = k - k.mean(2, keepdim=True)
    assert float((keys.dequantized() - centred).abs().max() / centred.abs().max()) < 0.07
    # The premise: a key offset per head shifts every score of a query cell alike.
    options = dict(stride=4, block_q=16, block_k=16, scale=0.25, causal=True)
    shifted = k + torch.randn(2, 2, 1, 16)
    assert torch.allclose(
        antidiagonal_block_probs_reference(q, shifted, **options), antidiagonal_block_probs_reference(q, k, **options),
        atol=1e-5,
    )  # fmt: skip


def test_score_precision_and_fp8_keys_are_checked():
    from sparse_attn.ops.antidiagonal import antidiagonal_block_probs

    q, k, _ = random_qkv(1, 2, 1, 64, 64, 16, dtype=torch.float32, seed=23)
    options = dict(stride=4, block_q=16, block_k=16, scale=0.25, causal=True)
    with pytest.raises(ValueError, match="score_precision"):
        antidiagonal_block_probs(q, k, **options, score_precision="int4")
    with pytest.raises(ValueError, match="keys_fp8 is only used"):
        antidiagonal_block_probs(q, k, **options, keys_fp8=fp8_keys(k))
    with pytest.raises(ValueError, match="keys_fp8 must be"):
        antidiagonal_block_probs(q, k, **options, score_precision="fp8", keys_fp8=fp8_keys(k[:, :, :32]))
    with pytest.raises(ValueError, match="score_precision"):
        sa.get_method("xattention").make_config(score_precision="fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [4096, 16384])
def test_fp8_scoring_kernel_matches_the_reference_on_gpu(seq):
    q, k, _ = random_qkv(1, 8, 2, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=24)
    options = dict(stride=8, block_q=128, block_k=128, scale=128**-0.5, causal=True, score_precision="fp8")
    keys = fp8_keys(k)
    reference = antidiagonal_block_probs_reference(q, k, **options, keys_fp8=keys)
    kernel = antidiagonal_block_probs_triton(q, k, **options, keys_fp8=keys)
    assert torch.allclose(kernel, reference, atol=2e-3)
    valid = causal_block_mask(seq, seq, 128, 128, "cuda")
    assert torch.allclose(kernel.sum(-1), torch.ones_like(kernel[..., 0]), atol=1e-3)
    assert bool((kernel[..., ~valid] == 0).all())
    # The xattention estimate in fp8 keeps nearly the 16-bit estimate's blocks.
    exact = sa.estimate(q, k, "xattention").to_mask()
    fp8 = sa.estimate(q, k, "xattention", score_precision="fp8").to_mask()
    assert float((exact != fp8).float().mean()) < 0.02
