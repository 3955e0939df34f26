"""Last-query probe operator: vertical, slash and block sums against brute force; head chunking; the kernel
against the reference (under the interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, poisoned_allocate, random_qkv, relative_error

from sparse_attn.ops import last_query_probe
from sparse_attn.ops.last_query_probe import naive as probe_naive
from sparse_attn.ops.last_query_probe import probe_last_queries
from sparse_attn.ops.last_query_probe import triton as probe_triton
from sparse_attn.ops.last_query_probe.naive import probe_last_queries as probe_last_queries_reference


def test_probe_sums_match_brute_force():
    q, k, _ = random_qkv(1, 4, 2, 24, 40, 16, seed=4)
    scale = 0.25
    sums = probe_last_queries(q, k, num_queries=8, block_k=16, scale=scale, causal=True)
    group = 2
    logits = (q[:, :, -8:] @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    positions = torch.arange(32, 40)
    keys = torch.arange(40)
    logits = logits.masked_fill(keys[None, :] > positions[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    expected_slash = torch.zeros(1, 4, 40)
    for row, position in enumerate(positions.tolist()):
        for key in range(position + 1):
            expected_slash[..., position - key] += probs[..., row, key]
    assert torch.allclose(sums.vertical, probs.sum(-2), atol=1e-6)
    assert torch.allclose(sums.slash, expected_slash, atol=1e-6)
    expected_block = torch.stack([probs.sum(-2)[..., start : start + 16].sum(-1) for start in (0, 16, 32)], -1)
    assert torch.allclose(sums.block, expected_block, atol=1e-6)


def test_probe_chunking_within_a_gqa_group_matches_unchunked(monkeypatch):
    q, k, _ = random_qkv(1, 8, 2, 40, 70, 16, seed=7)
    whole = probe_last_queries(q, k, num_queries=8, block_k=16, scale=0.25, causal=True)
    monkeypatch.setattr(probe_naive, "CHUNK_ELEMENTS", 64)  # one query head per chunk
    chunked = probe_last_queries(q, k, num_queries=8, block_k=16, scale=0.25, causal=True)
    assert torch.allclose(whole.vertical, chunked.vertical) and torch.allclose(whole.slash, chunked.slash)


# (batch, q heads, kv heads, Sq, Sk, head_dim, num_queries, dtype, causal, tiles_per_chunk): odd
# lengths, Sq < Sk, rows below / at num_queries and not a power of two, GQA 1-8, non-power-of-2
# head counts, one- and several-tile chunks (None: the interpreter's default, two).
KERNEL_CASES = [
    (1, 4, 4, 97, 97, 64, 16, torch.float32, True, None),
    (2, 6, 2, 40, 150, 128, 24, torch.float32, True, 1),
    (1, 8, 1, 20, 97, 64, 32, torch.bfloat16, True, 3),
    (1, 4, 1, 33, 150, 128, 12, torch.bfloat16, False, None),
    (1, 7, 7, 50, 70, 256, 8, torch.float32, True, None),
    (2, 3, 3, 70, 130, 64, 64, torch.float16, True, 2),
    (1, 2, 1, 9, 45, 16, 128, torch.float32, False, 1),
]


def _kernel_sums(q, k, *, num_queries, causal, tiles_per_chunk, monkeypatch):
    # The kernel's outputs and scratch are NaN-poisoned: every entry it should write must be written.
    monkeypatch.setattr(probe_triton, "_empty", poisoned_allocate)
    return probe_triton.probe_last_queries_triton(
        q, k, num_queries=num_queries, block_k=16, scale=q.shape[-1] ** -0.5, causal=causal,
        tiles_per_chunk=tiles_per_chunk,
    )  # fmt: skip


@pytest.mark.parametrize("batch, q_heads, kv_heads, seq_q, seq_k, dim, num_queries, dtype, causal, tiles", KERNEL_CASES)
def test_kernel_matches_reference(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, num_queries, dtype, causal, tiles, monkeypatch
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype)
    sums = _kernel_sums(q, k, num_queries=num_queries, causal=causal, tiles_per_chunk=tiles, monkeypatch=monkeypatch)
    rows = min(num_queries, seq_q)
    scale = dim**-0.5
    # Float32 products of the same inputs: the kernel's float32 accumulation matches them closely.
    exact = probe_last_queries_reference(
        q.float(), k.float(), num_queries=num_queries, block_k=16, scale=scale, causal=causal
    )
    # The reference on the inputs' own dtype rounds 16-bit logits: a looser bound, relative to the row count.
    same_dtype = probe_last_queries_reference(q, k, num_queries=num_queries, block_k=16, scale=scale, causal=causal)
    assert sums.num_queries == rows
    for name in ("vertical", "slash", "block"):
        out, expected = getattr(sums, name), getattr(exact, name)
        assert out.dtype == torch.float32 and out.shape == expected.shape, name
        assert torch.allclose(out, expected, rtol=1e-4, atol=1e-6), (name, (out - expected).abs().max())
        loose = TOLERANCE[dtype] * rows
        assert (out - getattr(same_dtype, name)).abs().max() <= loose, name
    assert torch.allclose(sums.vertical.sum(-1), torch.full((batch, q_heads), float(rows)), rtol=1e-5)
    if causal:
        assert torch.allclose(sums.slash.sum(-1), torch.full((batch, q_heads), float(rows)), rtol=1e-5)
    else:
        assert not sums.slash.any()


@pytest.mark.parametrize("causal", [True, False])
def test_kernel_without_slash_gives_the_same_vertical_and_block_sums(causal, monkeypatch):
    q, k, _ = random_qkv(2, 4, 2, 37, 90, 32, seed=int(torch.randint(0, 2**31 - 1, (1,))))
    case = dict(num_queries=20, causal=causal, tiles_per_chunk=2, monkeypatch=monkeypatch)
    full = _kernel_sums(q, k, **case)
    monkeypatch.setattr(probe_triton, "_empty", poisoned_allocate)
    lean = probe_triton.probe_last_queries_triton(
        q, k, num_queries=20, block_k=16, scale=32**-0.5, causal=causal, tiles_per_chunk=2, slash=False
    )
    assert lean.slash is None and lean.num_queries == full.num_queries
    assert torch.equal(lean.vertical, full.vertical) and torch.equal(lean.block, full.block)


def test_kernel_is_deterministic_and_chunking_changes_only_rounding(monkeypatch):
    q, k, _ = random_qkv(1, 2, 1, 30, 111, 64, seed=5)
    case = dict(num_queries=24, causal=True, monkeypatch=monkeypatch)
    first = _kernel_sums(q, k, tiles_per_chunk=2, **case)
    again = _kernel_sums(q, k, tiles_per_chunk=2, **case)
    other = _kernel_sums(q, k, tiles_per_chunk=5, **case)
    for name in ("vertical", "slash", "block"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
        assert torch.allclose(getattr(first, name), getattr(other, name), rtol=1e-5, atol=1e-7), name


def test_entry_point_dispatches_to_the_kernel(monkeypatch):
    q, k, _ = random_qkv(1, 4, 2, 20, 50, 64, seed=2)
    calls = []
    real = probe_triton.probe_last_queries_triton

    def spy(*args, **kwargs):
        calls.append(kwargs["num_queries"])
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_triton, "probe_last_queries_triton", spy)
    monkeypatch.setattr(last_query_probe, "kernel_for", lambda x, package, **case: probe_triton)
    sums = probe_last_queries(q, k, num_queries=8, block_k=16, scale=0.125, causal=True)
    expected = probe_last_queries_reference(q, k, num_queries=8, block_k=16, scale=0.125, causal=True)
    assert calls == [8]
    assert torch.allclose(sums.slash, expected.slash, atol=1e-6)


def test_unsupported_cases_are_named():
    q, k, _ = random_qkv(1, 2, 1, 8, 16, 64, seed=1)
    assert probe_triton.unsupported_reason(q, k=k, num_queries=8) is None
    assert "head_dim" in probe_triton.unsupported_reason(
        torch.zeros(1, 2, 8, 96), k=torch.zeros(1, 1, 16, 96), num_queries=8
    )
    long_q = torch.zeros(1, 2, 200, 64)
    assert "probe rows" in probe_triton.unsupported_reason(long_q, k=torch.zeros(1, 1, 200, 64), num_queries=129)
    assert "one dtype" in probe_triton.unsupported_reason(q, k=k.half(), num_queries=8)
    assert "float16" in probe_triton.unsupported_reason(q.double(), k=k.double(), num_queries=8)
    with pytest.raises(ValueError, match="head_dim"):
        probe_triton.probe_last_queries_triton(
            torch.zeros(1, 2, 8, 96), torch.zeros(1, 1, 16, 96), num_queries=8, block_k=16, scale=0.1, causal=True
        )
    assert last_query_probe.__all__ == ["ProbeSums", "block_sum", "probe_last_queries"]


@pytest.mark.gpu
@pytest.mark.parametrize("num_queries", [128, 64])
def test_kernel_matches_reference_on_gpu(num_queries):
    q, k, _ = random_qkv(1, 32, 8, 16384, 16384, 128, dtype=torch.bfloat16, device="cuda", seed=11)
    scale = 128**-0.5
    sums = probe_last_queries(
        q, k, num_queries=num_queries, block_k=128, scale=scale, causal=True
    )  # the kernel on CUDA
    again = probe_last_queries(q, k, num_queries=num_queries, block_k=128, scale=scale, causal=True)
    exact = probe_last_queries_reference(
        q.float(), k.float(), num_queries=num_queries, block_k=128, scale=scale, causal=True
    )
    same_dtype = probe_last_queries_reference(q, k, num_queries=num_queries, block_k=128, scale=scale, causal=True)
    for name in ("vertical", "slash", "block"):
        out = getattr(sums, name)
        assert torch.equal(out, getattr(again, name)), name  # no atomics: identical run to run
        assert relative_error(out, getattr(exact, name)) < 1e-4, name
        assert (out - getattr(same_dtype, name)).abs().max() <= 1e-2 * num_queries, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, dim", [(torch.float32, 128), (torch.float16, 256), (torch.bfloat16, 64)])
def test_kernel_other_dtypes_and_head_dims_on_gpu(dtype, dim):
    q, k, _ = random_qkv(2, 6, 2, 1000, 3001, dim, dtype=dtype, device="cuda", seed=12)
    for causal in (True, False):
        sums = probe_last_queries(q, k, num_queries=100, block_k=64, scale=dim**-0.5, causal=causal)
        exact = probe_last_queries_reference(
            q.float(), k.float(), num_queries=100, block_k=64, scale=dim**-0.5, causal=causal
        )
        for name in ("vertical", "slash", "block"):
            if causal or name != "slash":
                assert relative_error(getattr(sums, name), getattr(exact, name)) < 1e-4, (name, causal)
