"""The BLASST skipping kernel (:mod:`sparse_attn.backends.triton_blasst`) against the reference rule.

CPU under ``TRITON_INTERPRET=1`` at small shapes (batch 2, 4 query / 2 KV heads, head_dim 64,
odd lengths, ``Sq < Sk``, 6 / 3 heads too, lists per KV head / query head / shared), outputs NaN-poisoned:

* on inputs whose KV blocks sit at different score levels (so some candidates are skipped and
  some are not, differently per head), the kernel's output, LSE and per-query-block computed
  counts equal :mod:`sparse_attn.backends.blasst_reference`'s, in float32 and bfloat16;
* ``λ = 0`` is the candidate pattern's attention (the reference backend's), every candidate counted;
* a planted sink: the counts are exactly the diagonal plus the sink block where the query
  head shares the sink direction, and every candidate where it does not (this also pins the
  visiting order: diagonal first, then ascending);
* routing: CPU ``auto`` runs the reference rule, ``triton`` the kernel, ``gluon`` the kernel with
  one warning, ``flex`` the reference with one warning, unsupported blocks and inputs that
  require grad the reference with one warning (gradients flow through the computed blocks).

GPU tests (``-m gpu``) at 32K and 128K tokens.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import TOLERANCE, random_qkv, relative_error, shape_pattern

import sparse_attn as sa
import sparse_attn.methods.blasst  # noqa: F401  (registers blasst until methods/__init__ lists it)
from sparse_attn.backends import blasst_reference, triton_blasst
from sparse_attn.skip_pattern import SkipThresholdPattern, resolve_skip_backend


def leveled_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, *, block_k, dtype, seed, device="cpu"):
    """q and k share a unit direction ``u``: ``scale * q·k ≈ c_h * level + N(0, ~0.6)``, with a
    random level in {0, 3, 6, 9} per (batch, KV head, KV block) and a per-query-head factor
    ``c_h`` in {1, 0.5}, so the skip rule keeps some blocks and skips others, per head."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator)
    direction = direction / direction.norm()
    n_kv = math.ceil(seq_k / block_k)
    levels = 3.0 * torch.randint(0, 4, (batch, kv_heads, n_kv), generator=generator).float()
    per_key = levels.repeat_interleave(block_k, dim=2)[:, :, :seq_k]
    factor = torch.tensor([1.0 if head % 2 == 0 else 0.5 for head in range(q_heads)])
    q = dim**0.5 * factor[None, :, None, None] * direction + 0.5 * torch.randn(
        batch, q_heads, seq_q, dim, generator=generator
    )
    k = per_key[..., None] * direction + 0.5 * torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def skip_pattern(candidates, threshold: float) -> SkipThresholdPattern:
    return SkipThresholdPattern.over(candidates, threshold)


CASES = [
    # (dtype, causal, seq_q, seq_k, query / KV heads, pattern heads: "kv" | "q" | 1, candidates density)
    (torch.float32, True, 157, 157, (6, 3), "kv", 1.0),
    (torch.bfloat16, True, 101, 171, (4, 2), "q", 0.7),
    (torch.float32, False, 139, 139, (4, 2), 1, 0.7),
]


@pytest.mark.parametrize(("dtype", "causal", "seq_q", "seq_k", "head_counts", "heads", "density"), CASES)
def test_kernel_matches_the_reference_rule(dtype, causal, seq_q, seq_k, head_counts, heads, density, poison_outputs):
    (q_heads, kv_heads), batch, dim, block = head_counts, 2, 64, 32
    q, k, v = leveled_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, block_k=block, dtype=dtype, seed=seq_k)
    pattern_heads = {"kv": kv_heads, "q": q_heads, 1: 1}[heads]
    shape = (batch, q_heads, kv_heads, seq_q, seq_k, dim, block, block)
    candidates = shape_pattern(shape, heads=pattern_heads, density=density, causal=causal, seed=seq_q)
    pattern = skip_pattern(candidates, 1e-2)
    scale = dim**-0.5
    out, lse, computed = triton_blasst.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=True)
    want_out, want_lse, want_computed = blasst_reference.forward(
        q, k, v, pattern, causal=causal, scale=scale, return_lse=True
    )
    assert torch.equal(computed, want_computed)
    listed = candidates.expand_heads(q_heads).kv_counts.expand(batch, -1, -1)
    skipped = listed - computed
    assert int(skipped.min()) >= 0 and int(skipped.sum()) > 0 and int(computed.sum()) > q_heads * batch * 2
    # Per-head decisions: the two query heads of a group (different c_h) skip differently.
    assert not torch.equal(computed[:, 0::2], computed[:, 1::2])
    assert relative_error(out, want_out) <= TOLERANCE[dtype]
    assert float((lse - want_lse).abs().max()) <= 1e-3


def test_threshold_zero_is_the_candidate_attention(poison_outputs):
    batch, q_heads, kv_heads, seq, dim, block = 2, 4, 2, 141, 64, 32
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq, seq, dim, seed=7)
    shape = (batch, q_heads, kv_heads, seq, seq, dim, block, block)
    candidates = shape_pattern(shape, heads=kv_heads, density=0.6, causal=True, seed=7)
    out, lse, computed = triton_blasst.forward(
        q, k, v, skip_pattern(candidates, 0.0), causal=True, scale=dim**-0.5, return_lse=True
    )
    want_out, want_lse = sa.block_sparse_attention(q, k, v, candidates, backend="reference", return_lse=True)
    assert relative_error(out, want_out) <= 1e-5
    assert float((lse - want_lse).abs().max()) <= 1e-4
    assert torch.equal(computed, candidates.expand_heads(q_heads).kv_counts.expand(batch, -1, -1))


def planted_sink(batch, q_heads, kv_heads, seq, dim, *, block, sink_logit):
    """Query heads 0, 2, ... and the first KV block share a direction (scaled logit ``sink_logit``);
    everything else is small noise. Heads 1, 3, ... see near-uniform scores."""
    generator = torch.Generator().manual_seed(11)
    direction = torch.zeros(dim)
    direction[0] = 1.0
    q = 0.05 * torch.randn(batch, q_heads, seq, dim, generator=generator)
    k = 0.05 * torch.randn(batch, kv_heads, seq, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    q[:, 0::2] += dim**0.5 * direction
    k[:, :, :block] += sink_logit * direction
    return q, k, v


def test_planted_sink_skips_everything_but_the_diagonal_and_the_sink(poison_outputs):
    batch, q_heads, kv_heads, seq, dim, block = 2, 4, 2, 165, 64, 32
    q, k, v = planted_sink(batch, q_heads, kv_heads, seq, dim, block=block, sink_logit=10.0)
    candidates = sa.dense_pattern(seq_q=seq, seq_k=seq, block_q=block, block_k=block)
    pattern = sa.estimate(q, k, "blasst", threshold=1e-2, block_q=block, block_k=block)
    out, _, computed = triton_blasst.forward(q, k, v, pattern, causal=True, scale=dim**-0.5)
    n_q = candidates.num_q_blocks
    # Sharing heads: the diagonal (visited first, scores ~0), then the sink (~10: kept), then
    # every other block (~0 < 10 + ln 0.01): skipped. The other heads keep every candidate.
    sharing = torch.tensor([min(block_index + 1, 2) for block_index in range(n_q)], dtype=torch.int32)
    assert torch.equal(computed[:, 0::2], sharing.expand(batch, q_heads // 2, n_q))
    assert torch.equal(computed[:, 1::2], torch.arange(1, n_q + 1, dtype=torch.int32).expand(batch, q_heads // 2, n_q))
    # What was skipped weighed at most e^-10 of the sink's weight per key.
    dense = sa.block_sparse_attention(q, k, v, candidates, backend="reference")
    assert relative_error(out, dense) <= 5e-3
    want_out, _, want_computed = blasst_reference.forward(q, k, v, pattern, causal=True, scale=dim**-0.5)
    assert torch.equal(computed, want_computed) and relative_error(out, want_out) <= 1e-5


def test_routing_and_fallbacks():
    batch, q_heads, kv_heads, seq, dim = 1, 2, 1, 70, 64
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq, seq, dim, seed=3)
    pattern = sa.estimate(q, k, "blasst", threshold=0.0, block_q=32, block_k=32)
    assert isinstance(pattern, SkipThresholdPattern)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_skip_backend("auto", q, k, v, pattern) == "reference"  # CPU: no kernel
        assert resolve_skip_backend("reference", q, k, v, pattern) == "reference"
        assert resolve_skip_backend("triton", q, k, v, pattern) == "triton"  # the interpreter
    with pytest.warns(UserWarning, match="gluon backend has no in-kernel skip rule"):
        assert resolve_skip_backend("gluon", q, k, v, pattern) == "triton"
    with pytest.warns(UserWarning, match="flex backend has no in-kernel skip rule"):
        assert resolve_skip_backend("flex", q, k, v, pattern) == "reference"
    small = sa.estimate(q, k, "blasst", threshold=0.0, block_q=8, block_k=8)
    with pytest.warns(UserWarning, match="block_q in"):
        assert resolve_skip_backend("triton", q, k, v, small) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_skip_backend("cudnn", q, k, v, pattern)
    # Inputs that require grad: the reference rule, differentiable; at λ = 0 its gradients are
    # the candidate pattern's.
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with pytest.warns(UserWarning, match="forward-only"):
        out = sa.block_sparse_attention(*leaves, pattern, backend="triton")
    out.square().sum().backward()
    plain = [x.clone().requires_grad_() for x in (q, k, v)]
    sa.block_sparse_attention(*plain, pattern.candidates(), backend="reference").square().sum().backward()
    for got, want in zip(leaves, plain, strict=True):
        assert relative_error(got.grad, want.grad) <= 1e-5


def test_unsupported_reasons():
    q, k, v = random_qkv(1, 2, 1, 40, 40, 64, seed=1)
    plain = sa.dense_pattern(seq_q=40, seq_k=40, block_q=16, block_k=16)
    assert "SkipThresholdPattern" in triton_blasst.unsupported_reason(q, k, v, plain, return_lse=False)
    wide = skip_pattern(sa.dense_pattern(seq_q=40, seq_k=40, block_q=256, block_k=16), 0.1)
    assert "block_q" in triton_blasst.unsupported_reason(q, k, v, wide, return_lse=False)
    assert triton_blasst.unsupported_reason(q, k, v, skip_pattern(plain, 0.1), return_lse=False) is None
    assert "forward-only" in triton_blasst.gradient_unsupported_reason(q)


def _gpu_structured(seq, q_heads, kv_heads, *, seed=0):
    """q and k share a direction (logit ~ strength^2 / sqrt(D) at distance 0) plus noise, then RoPE."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from estimators import Shape, structured_qkv

    shape = Shape(seq=seq, q_heads=q_heads, kv_heads=kv_heads)
    return structured_qkv(shape, strength=12.0, device=torch.device("cuda"), seed=seed)


@pytest.mark.gpu
def test_gpu_32k_kernel_matches_the_reference_rule(poison_outputs):
    q, k, v = _gpu_structured(32768, 4, 1)
    pattern = sa.estimate(q, k, "blasst")  # λ = 0.8 / 32768, dense causal candidates
    out, lse, computed = triton_blasst.forward(q, k, v, pattern, causal=True, scale=128**-0.5, return_lse=True)
    want_out, want_lse, want_computed = blasst_reference.forward(
        q, k, v, pattern, causal=True, scale=128**-0.5, return_lse=True
    )
    # Scores summed in another order may flip a decision sitting on the threshold: allow a few.
    assert int((computed != want_computed).sum()) <= max(2, computed.numel() // 1000)
    assert int(computed.min()) >= 1
    assert relative_error(out, want_out) <= 1e-2
    assert float((lse - want_lse).abs().max()) <= 2e-2


@pytest.mark.gpu
def test_gpu_128k_threshold_zero_equals_the_dense_kernel_and_skipping_stays_close(poison_outputs):
    q, k, v = _gpu_structured(131072, 8, 2)
    candidates = sa.dense_pattern(seq_q=q.shape[2], seq_k=k.shape[2], device=q.device)
    dense = sa.block_sparse_attention(q, k, v, candidates, backend="triton")
    out, _, computed = triton_blasst.forward(q, k, v, skip_pattern(candidates, 0.0), causal=True, scale=128**-0.5)
    assert relative_error(out, dense) <= 1e-2
    assert torch.equal(computed, candidates.expand_heads(8).kv_counts)
    pattern = sa.estimate(q, k, "blasst")  # λ = 0.8 / 131072
    out, _, computed = triton_blasst.forward(q, k, v, pattern, causal=True, scale=128**-0.5)
    assert bool(torch.isfinite(out).all())
    assert int(computed.min()) >= 1 and bool((computed <= candidates.expand_heads(8).kv_counts).all())
