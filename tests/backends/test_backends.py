"""Every backend against the reference, and the reference against a naive float64 oracle."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import (
    TOLERANCE,
    naive_attention,
    poisoned_allocate,
    random_qkv,
    relative_error,
    shape_pattern,
    text_rows_pattern,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn.backends import kernel_configs, launch, resolve_backend
from sparse_attn.plan import plan_for

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k)
SHAPES = [
    (1, 1, 1, 64, 64, 64, 16, 16),
    (2, 4, 1, 100, 130, 64, 32, 32),
    (3, 8, 2, 77, 77, 128, 32, 16),
    (1, 4, 1, 50, 90, 256, 16, 32),
    (1, 32, 8, 40, 40, 64, 16, 16),
    (1, 2, 1, 129, 257, 128, 64, 32),
]
DENSITIES = [0.0, 0.3, 1.0]


def _pattern(shape, density, causal, per_query_head, seed, device="cpu"):
    heads = shape[1] if per_query_head else shape[2]
    return shape_pattern(shape, heads=heads, density=density, causal=causal, seed=seed, device=device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_naive_oracle(shape, causal):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, _, _ = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, torch.float64)
    for density in DENSITIES:
        pattern = _pattern(shape, density, causal, per_query_head=density == 0.3, seed=1)
        out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=True)
        expected, expected_lse = naive_attention(q, k, v, pattern, causal)
        assert relative_error(out, expected) < 1e-10
        assert torch.allclose(lse.double(), expected_lse, atol=1e-5)


# Token-level patterns (block_q < 16): the reference walks groups of query blocks over the union of
# their lists (backends/reference.py, _grouped_forward).
TOKEN_SHAPES = [
    (2, 4, 2, 70, 70, 32, 1, 16),
    (1, 6, 3, 45, 100, 64, 4, 32),
    (2, 3, 1, 300, 333, 16, 8, 16),
]


@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_reference_on_token_level_patterns_matches_naive_oracle(shape, causal, monkeypatch):
    from sparse_attn.backends import reference

    batch, q_heads, kv_heads, seq_q, seq_k, dim, _, _ = shape
    q, k, v = (x.requires_grad_() for x in random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, torch.float64))
    pattern = _pattern(shape, 0.3, causal, per_query_head=shape[6] != 4, seed=2)
    assert reference._rows_per_group(pattern, v) > 1
    out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=True)
    expected, expected_lse = naive_attention(q, k, v, pattern, causal)
    assert relative_error(out.detach(), expected.detach()) < 1e-10
    finite = torch.isfinite(expected_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.allclose(lse.double()[finite], expected_lse[finite])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(torch.nan_to_num(expected), (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) < 1e-8
    # A NaN in V: the per-block walk (the documented propagation), identical to a forced per-block run.
    poisoned = v.detach().clone()
    poisoned[0, 0, seq_k // 2, 0] = float("nan")
    assert reference._rows_per_group(pattern, poisoned) == 1
    grouped = sa.block_sparse_attention(q.detach(), k.detach(), v.detach(), pattern, causal=causal, backend="reference")
    monkeypatch.setattr(reference, "_rows_per_group", lambda pattern, v: 1)
    per_block = sa.block_sparse_attention(
        q.detach(), k.detach(), v.detach(), pattern, causal=causal, backend="reference"
    )
    assert relative_error(grouped, per_block) < 1e-12


def _check_backend(backend, shape, dtype, causal, device, seed):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, _, _ = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype, device, transposed=seed % 2 == 1)
    for density in DENSITIES:
        pattern = _pattern(shape, density, causal, per_query_head=density == 0.3, seed=seed, device=device)
        want_lse = backend == "triton" or device != "cpu"
        result = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend=backend, return_lse=want_lse)
        expected = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=want_lse)
        out, ref = (result[0], expected[0]) if want_lse else (result, expected)
        assert out.shape == ref.shape and out.dtype == q.dtype
        assert torch.isfinite(out).all(), "unwritten or non-finite output elements"
        assert relative_error(out, ref) <= TOLERANCE[dtype], (backend, density)
        if want_lse:
            assert torch.isfinite(result[1]).all()
            assert torch.allclose(result[1], expected[1], atol=2e-2 if dtype != torch.float32 else 1e-4)


# Every shape in bfloat16, causal and not, and in float32 causal; float32 non-causal and float16
# (the kernel's other 16-bit operand type, on the same code path) on the two cheapest shapes; the
# 32-head shape (the slowest under the interpreter) in bfloat16 and causal only. The fuzz test
# below draws the other combinations; the suite's CPU time stays bounded.
SHAPE_DTYPE_CAUSAL = [
    (shape, dtype, causal)
    for shape in SHAPES
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
    for causal in (True, False)
    if (shape[1] < 32 or (dtype == torch.bfloat16 and causal))
    and (dtype == torch.bfloat16 or (causal and dtype == torch.float32) or shape in (SHAPES[0], SHAPES[3]))
]


@pytest.mark.parametrize("shape, dtype, causal", SHAPE_DTYPE_CAUSAL, ids=str)
def test_triton_matches_reference(shape, dtype, causal, poison_outputs):
    _check_backend("triton", shape, dtype, causal, "cpu", seed=7)


@pytest.mark.parametrize(
    "shape",
    [(1, 2, 1, 48, 96, 64, 32, 32), (2, 2, 2, 96, 200, 64, 32, 32)],
    ids=["keys-whole-blocks-queries-not", "queries-whole-blocks-keys-not"],
)
@pytest.mark.parametrize("causal", [True, False])
def test_triton_whole_block_lengths_drop_bounds_masks(shape, causal, poison_outputs):
    # The kernel drops bounds masks on keys (queries) when their length is a multiple of the
    # pattern's block; each case has one side whole and the other with a tail.
    _check_backend("triton", shape, torch.bfloat16, causal, "cpu", seed=4)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flex_matches_reference(shape, dtype):
    _check_backend("flex", shape, dtype, True, "cpu", seed=3)


def test_flex_non_causal_and_lse_fallback():
    shape = SHAPES[1]
    _check_backend("flex", shape, torch.float32, False, "cpu", seed=5)
    q, k, v = random_qkv(1, 2, 1, 64, 64, 64)
    pattern = sa.dense_pattern(seq_q=64, block_q=16, block_k=16)
    with pytest.warns(UserWarning, match="log-sum-exp"):
        out, lse = sa.block_sparse_attention(q, k, v, pattern, backend="flex", return_lse=True)
    assert lse.shape == (1, 2, 64)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads=st.sampled_from([(1, 1), (4, 1), (8, 2), (6, 3)]),
    batch=st.integers(1, 3),
    seq_q=st.integers(1, 150),
    extra_k=st.integers(0, 70),
    dim=st.sampled_from([64, 128, 256]),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 32), (64, 64)]),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    causal=st.booleans(),
    per_query_head=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_triton_against_reference(
    heads, batch, seq_q, extra_k, dim, blocks, density, dtype, causal, per_query_head, seed
):
    q_heads, kv_heads = heads
    seq_k = seq_q + extra_k
    shape = (batch, q_heads, kv_heads, seq_q, seq_k, dim, *blocks)
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype, seed=seed)
    pattern = _pattern(shape, density, causal, per_query_head, seed)
    # A function-scoped fixture would not reset between hypothesis examples: poison by hand.
    with pytest.MonkeyPatch.context() as patcher:
        patcher.setattr(launch, "allocate", poisoned_allocate)
        out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="triton", return_lse=True)
    ref, ref_lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference", return_lse=True)
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    assert torch.allclose(lse, ref_lse, atol=2e-2)


def test_pattern_broadcast_over_batch_and_kv_heads(poison_outputs):
    q, k, v = random_qkv(3, 8, 2, 70, 70, 64, torch.float16)
    shared = sa.random_pattern(batch=1, heads=2, seq_q=70, density=0.5, block_q=16, block_k=16, seed=4)
    per_head = shared.expand_heads(8)
    out_shared = sa.block_sparse_attention(q, k, v, shared, backend="triton")
    out_expanded = sa.block_sparse_attention(q, k, v, per_head, backend="reference")
    assert relative_error(out_shared, out_expanded) <= 1e-2


def test_auto_on_cpu_runs_the_reference_backend_without_a_warning():
    q, k, v = random_qkv(1, 4, 2, 96, 96, 64)
    pattern = sa.random_pattern(heads=2, seq_q=96, density=0.5, block_q=32, block_k=32, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert resolve_backend("auto", q, k, v, pattern, causal=True, return_lse=True) == "reference"


def test_dense_pattern_equals_sdpa():
    q, k, v = random_qkv(2, 8, 2, 96, 96, 64)
    out = sa.sparse_attention(q, k, v, method="dense", block_q=32, block_k=32, backend="reference")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert relative_error(out, expected) < 1e-5


def test_nan_inputs_propagate_and_can_be_rejected():
    q, k, v = random_qkv(1, 2, 1, 64, 64, 64)
    q[0, 0, 5, 0] = float("nan")
    pattern = sa.dense_pattern(seq_q=64, block_q=16, block_k=16)
    out = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    assert torch.isnan(out[0, 0, 5]).all() and torch.isfinite(out[0, 1]).all()
    with pytest.raises(ValueError, match="q contains NaN"):
        sa.block_sparse_attention(q, k, v, pattern, check_inputs_finite=True)


def test_reference_supports_autograd_and_fast_backends_fall_back():
    q, k, v = random_qkv(1, 2, 1, 48, 48, 64)
    q.requires_grad_(True)
    pattern = sa.dense_pattern(seq_q=48, block_q=16, block_k=16)
    with pytest.warns(UserWarning, match="require grad"):
        out = sa.block_sparse_attention(q, k, v, pattern, backend="flex")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_unsupported_triton_case_falls_back_with_one_warning():
    q, k, v = random_qkv(1, 2, 1, 40, 40, 32)
    pattern = sa.dense_pattern(seq_q=40, block_q=24, block_k=24)  # blocks of 24 are not a kernel tile
    with pytest.warns(UserWarning, match="power of two"):
        out = sa.block_sparse_attention(q, k, v, pattern, backend="triton")
    expected = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    assert relative_error(out, expected) < 1e-6


def test_a_head_dim_that_is_not_a_kernel_size_runs_on_the_kernel_zero_padded():
    q, k, v = random_qkv(1, 2, 1, 40, 40, 48)  # head_dim 48 is not a kernel size: padded to 64
    pattern = sa.dense_pattern(seq_q=40, block_q=16, block_k=16)
    with pytest.warns(UserWarning, match="zero-padded to 64"):
        out = sa.block_sparse_attention(q, k, v, pattern, backend="triton")
    expected = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    assert out.shape == q.shape
    assert relative_error(out, expected) < 1e-5


def test_sparse_attention_returns_info():
    q, k, v = random_qkv(1, 4, 2, 128, 128, 64)
    out, info = sa.sparse_attention(q, k, v, method="random", density=0.5, block_q=32, block_k=32, return_info=True)
    assert out.shape == q.shape
    assert 0 < info.density <= 1 and info.backend == "reference"  # auto on CPU
    assert info.estimate_ms >= 0 and info.attention_ms >= 0
    assert info.pattern.seq_q == 128


def _gpu_shapes():
    return SHAPES + [
        (1, 32, 8, 1000, 1500, 128, 128, 128),
        (2, 4, 1, 777, 777, 256, 64, 64),
        (1, 8, 8, 513, 513, 64, 128, 64),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", _gpu_shapes(), ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_gpu_backends_match_reference(shape, dtype, causal, backend, poison_outputs):
    if backend == "flex" and (not causal or dtype == torch.float16):
        pytest.skip("flex compiles once per shape: checked on a subset (causal, bf16/fp32) to keep the run short")
    _check_backend(backend, shape, dtype, causal, "cuda", seed=11)


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_sequence_length():
    """A 16K x 16K float32 score matrix would take 1 GiB; both backends stay far below.

    Each backend runs once first: the Triton autotuner's first call benchmarks its configs
    with ``triton.testing.do_bench``, which allocates a 256 MB buffer to flush the L2 cache
    (once per tuning key, freed after); the bound is on what a call itself allocates.
    """
    seq = 16384
    q, k, v = random_qkv(1, 4, 1, seq, seq, 128, torch.bfloat16, "cuda")
    pattern = sa.dense_pattern(seq_q=seq, device="cuda")
    for backend in ("reference", "triton"):
        sa.block_sparse_attention(q, k, v, pattern, backend=backend)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        sa.block_sparse_attention(q, k, v, pattern, backend=backend)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra < seq * seq * 4 / 4, (backend, extra)


@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_single_head_pattern_broadcasts_to_all_heads(backend):
    q, k, v = random_qkv(2, 8, 2, 70, 70, 64)
    shared = sa.random_pattern(heads=1, seq_q=70, density=0.5, block_q=16, block_k=16, seed=6)
    out = sa.block_sparse_attention(q, k, v, shared, backend=backend)
    expected = sa.block_sparse_attention(q, k, v, shared.expand_heads(8), backend="reference")
    assert relative_error(out, expected) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_column_wise_key_layout(dtype, poison_outputs):
    with kernel_configs(triton_loads=["columns"]):
        for shape in (SHAPES[1], SHAPES[3]):
            _check_backend("triton", shape, dtype, True, "cpu", seed=13)


def test_streams_per_wave_fill_half_the_l2_and_divide_the_streams():
    mib = 2**20
    # 16 MiB of K/V per stream, 50 MiB of L2: one stream fits in half of it, two do not.
    assert launch.streams_per_wave(8, 16 * mib, 50 * mib) == 1
    assert launch.streams_per_wave(8, 4 * mib, 50 * mib) == 4  # 6 fit; 4 is the largest divisor of 8
    assert launch.streams_per_wave(6, 4 * mib, 50 * mib) == 6
    assert launch.streams_per_wave(7, 4 * mib, 50 * mib) == 1  # a prime number of streams
    assert launch.streams_per_wave(8, 1 * mib, 50 * mib) == 8  # short sequences: one wave
    assert launch.streams_per_wave(8, 100 * mib, 50 * mib) == 1  # a stream larger than L2


def test_heads_per_wave_counts_whole_gqa_groups():
    q, k = torch.zeros(3, 8, 5, 16), torch.zeros(3, 2, 5, 16)  # 6 streams of 4 query heads
    assert launch.heads_per_wave(q, k) == 24  # off CUDA: one wave
    for asked, heads in ((0, 24), (1, 4), (2, 8), (4, 12), (100, 24)):
        with kernel_configs(kv_streams_per_wave=asked):
            assert launch.heads_per_wave(q, k) == heads, asked
    with pytest.raises(ValueError, match="kv_streams_per_wave"):
        with kernel_configs(kv_streams_per_wave=-1):
            pass


@pytest.mark.parametrize(
    "shape, causal", [(SHAPES[2], True), ((2, 6, 3, 70, 90, 64, 32, 16), False)], ids=["causal", "not-causal"]
)
def test_triton_launch_waves_change_no_result(shape, causal, poison_outputs):
    # Waves only reorder the programs: every wave size gives the one-wave result bit for bit.
    batch, q_heads, kv_heads, seq_q, seq_k, dim, _, _ = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, torch.bfloat16, "cpu")
    pattern = _pattern(shape, 0.5, causal, per_query_head=True, seed=3)
    results = {}
    for streams in (0, 1, 2):  # 6 streams each: one wave, 6 waves of 1, 3 waves of 2
        with kernel_configs(kv_streams_per_wave=streams):
            results[streams] = sa.block_sparse_attention(
                q, k, v, pattern, causal=causal, backend="triton", return_lse=True
            )
    reference = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference")
    assert relative_error(results[0][0], reference) <= TOLERANCE[torch.bfloat16]
    for streams in (1, 2):
        assert torch.equal(results[streams][0], results[0][0]), streams
        assert torch.equal(results[streams][1], results[0][1]), streams


def test_heavy_blocks_lead_the_work_order_and_respect_the_override():
    heavy = plan_for(text_rows_pattern(3, 20 * 16 - 5, 16), causal=False)
    assert heavy.heavy_blocks == 2  # 20 blocks against a mean of (2 + 17 * 3 + 2 * 20) / 20 = 4.65
    assert set(heavy.work_order[:2].tolist()) == {18, 19}
    assert launch.lead_blocks(heavy) == 2
    with kernel_configs(heavy_rows_first=False):
        assert launch.lead_blocks(heavy) == 0
    with pytest.raises(TypeError, match="heavy_rows_first"):
        with kernel_configs(heavy_rows_first=1):
            pass
    even = plan_for(shape_pattern(SHAPES[2], heads=2, density=0.5, causal=True, seed=0), causal=True)
    assert even.heavy_blocks == 0 and launch.lead_blocks(even) == 0
    # One query block: nothing to lead.
    single = plan_for(text_rows_pattern(2, 16, 16), causal=False)
    assert launch.lead_blocks(single) == 0


def test_triton_heavy_rows_lead_changes_no_result(poison_outputs):
    # The lead only reorders the programs: with and without it, in one wave or in waves, the
    # output and LSE are the same bit for bit (poisoned outputs: every tile is written once).
    q, k, v = random_qkv(1, 6, 3, 20 * 16 - 5, 20 * 16 - 5, 16, torch.bfloat16, "cpu")
    pattern = text_rows_pattern(6, 20 * 16 - 5, 16)
    assert plan_for(pattern, causal=False).heavy_blocks == 2
    results = {}
    # One wave orders the programs alike with or without the lead; 3 streams: 3 waves of 1.
    for streams, lead in ((0, True), (1, True), (1, False)):
        with kernel_configs(kv_streams_per_wave=streams, heavy_rows_first=lead):
            results[streams, lead] = sa.block_sparse_attention(
                q, k, v, pattern, causal=False, backend="triton", return_lse=True
            )
    reference = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference")
    first = results[0, True]
    assert relative_error(first[0], reference) <= TOLERANCE[torch.bfloat16]
    for key, (out, lse) in results.items():
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1]), key
