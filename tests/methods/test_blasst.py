"""blasst (BLASST, arXiv:2512.12087): the skip rule, the method's pattern, its routing through the API, bad options.

The rule in PyTorch (:mod:`sparse_attn.backends.blasst_reference`, the kernel's oracle) is
checked here against a float64 row-by-row walk written from the rule's statement (visiting
order: partial entries, then full ones ascending; skip when every row of the query block has
its block maximum below ``running max + ln λ``, or sees nothing of the block): outputs, LSE
and computed counts, causal and not, ``Sq < Sk``, GQA 2, lists per KV head / query head.
Properties: ``λ = 0`` is the candidate attention; the computed blocks shrink as ``λ`` grows (a
skipped block never raises any row's running maximum, so the maxima are the same for every
``λ``); a planted sink makes most blocks skip. The kernel itself is tested in
``tests/backends/test_triton_blasst.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import random_qkv, relative_error, shape_pattern

import sparse_attn as sa
import sparse_attn.methods.blasst  # noqa: F401  (registers blasst until methods/__init__ lists it)
from sparse_attn.backends import blasst_reference
from sparse_attn.masked_pattern import MaskedPattern
from sparse_attn.methods.blasst import BlasstConfig, skip_threshold
from sparse_attn.skip_pattern import SkipThresholdPattern, computed_density, visiting_order, with_threshold


def leveled_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, *, block_k, seed):
    """Float32 q, k, v whose KV blocks sit at random score levels {0, 2, 4, 6, 8} per (batch, KV head)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=generator)
    direction = direction / direction.norm()
    levels = 2.0 * torch.randint(0, 5, (batch, kv_heads, math.ceil(seq_k / block_k)), generator=generator)
    per_key = levels.float().repeat_interleave(block_k, dim=2)[:, :, :seq_k]
    q = dim**0.5 * direction + 0.5 * torch.randn(batch, q_heads, seq_q, dim, generator=generator)
    q[:, 1::2] *= 0.6  # the heads of a GQA group see different score ranges
    k = per_key[..., None] * direction + 0.5 * torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    return q, k, v


def walk_rows(q, k, v, pattern, *, causal, threshold):
    """The rule, one (batch, query head, query block) at a time in float64: ``(out, lse, computed)``."""
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    block_q, block_k = pattern.block_q, pattern.block_k
    scale, offset = dim**-0.5, seq_k - seq_q
    log_threshold = math.log(threshold) if threshold > 0 else -math.inf
    out = torch.zeros(batch, q_heads, seq_q, dim, dtype=torch.float64)
    lse = torch.zeros(batch, q_heads, seq_q, dtype=torch.float64)
    computed = torch.zeros(batch, q_heads, pattern.num_q_blocks, dtype=torch.int32)
    for b in range(batch):
        for h in range(q_heads):
            list_batch = b if pattern.batch == batch else 0
            list_head = h // (q_heads // pattern.num_heads)
            kv_head = h // (q_heads // kv_heads)
            for i in range(pattern.num_q_blocks):
                rows = torch.arange(i * block_q, min((i + 1) * block_q, seq_q))
                positions = rows + offset
                count = int(pattern.kv_counts[list_batch, list_head, i])
                listed = [int(j) for j in pattern.kv_indices[list_batch, list_head, i, :count]]
                whole = [
                    j
                    for j in listed
                    if (j + 1) * block_k <= seq_k and (not causal or (j + 1) * block_k - 1 <= int(positions[0]))
                ]
                order = [j for j in listed if j not in whole] + whole
                running = torch.full((len(rows),), -math.inf, dtype=torch.float64)
                total = torch.zeros(len(rows), dtype=torch.float64)
                acc = torch.zeros(len(rows), dim, dtype=torch.float64)
                for j in order:
                    keys = torch.arange(j * block_k, min((j + 1) * block_k, seq_k))
                    scores = scale * q[b, h, rows].double() @ k[b, kv_head, keys].double().T
                    if causal:
                        scores[keys[None, :] > positions[:, None]] = -math.inf
                    block_max = scores.max(dim=1).values
                    if bool(((block_max < running + log_threshold) | (block_max == -math.inf)).all()):
                        continue
                    new = torch.maximum(running, block_max)
                    shift = torch.where(new == -math.inf, 0.0, new)
                    weights = torch.exp(scores - shift[:, None])
                    alpha = torch.exp(running - shift)
                    total = total * alpha + weights.sum(1)
                    acc = acc * alpha[:, None] + weights @ v[b, kv_head, keys].double()
                    running = new
                    computed[b, h, i] += 1
                out[b, h, rows] = acc / total[:, None]
                lse[b, h, rows] = running + torch.log(total)
    return out, lse, computed


@pytest.mark.parametrize(
    ("causal", "seq_q", "seq_k", "heads"),
    [(True, 77, 77, "kv"), (True, 53, 90, "q"), (False, 69, 69, "kv")],
)
def test_reference_rule_matches_a_row_by_row_walk(causal, seq_q, seq_k, heads):
    batch, q_heads, kv_heads, dim, block = 2, 4, 2, 64, 16
    q, k, v = leveled_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, block_k=block, seed=seq_q)
    shape = (batch, q_heads, kv_heads, seq_q, seq_k, dim, block, block)
    candidates = shape_pattern(
        shape, heads=kv_heads if heads == "kv" else q_heads, density=0.8, causal=causal, seed=seq_k
    )
    pattern = SkipThresholdPattern.over(candidates, 1e-2)
    out, lse, computed = blasst_reference.forward(q, k, v, pattern, causal=causal, scale=dim**-0.5, return_lse=True)
    want_out, want_lse, want_computed = walk_rows(q, k, v, pattern, causal=causal, threshold=1e-2)
    assert torch.equal(computed, want_computed)
    listed = candidates.expand_heads(q_heads).kv_counts.expand(batch, -1, -1)
    assert 0 < int((listed - computed).sum()) < int(listed.sum()) - listed.numel()  # some skipped, not all
    assert relative_error(out, want_out) <= 1e-5
    assert float((lse.double() - want_lse).abs().max()) <= 1e-4


def test_visiting_order_puts_partial_entries_first():
    counts = torch.tensor([[4, 3, 1]], dtype=torch.int32)
    full = torch.tensor([[3, 1, 0]], dtype=torch.int32)
    order = visiting_order(counts, full, 4)
    assert order.tolist() == [[[3, 0, 1, 2], [1, 2, 0, 3], [0, 1, 2, 3]]]


def test_threshold_zero_is_the_candidate_attention_and_skips_shrink_as_threshold_grows():
    batch, q_heads, kv_heads, seq, dim, block = 2, 4, 2, 83, 64, 16
    q, k, v = leveled_qkv(batch, q_heads, kv_heads, seq, seq, dim, block_k=block, seed=5)
    candidates = sa.dense_pattern(seq_q=seq, seq_k=seq, block_q=block, block_k=block)
    pattern = SkipThresholdPattern.over(candidates, 0.0)
    out, lse, computed = blasst_reference.forward(q, k, v, pattern, causal=True, scale=dim**-0.5, return_lse=True)
    want_out, want_lse = sa.block_sparse_attention(q, k, v, candidates, backend="reference", return_lse=True)
    assert relative_error(out, want_out) <= 1e-6 and float((lse - want_lse).abs().max()) <= 1e-5
    assert torch.equal(computed, candidates.kv_counts.expand(batch, q_heads, -1))
    previous = computed
    for threshold in (1e-4, 1e-2, 0.1, 1.0):
        _, _, counts = blasst_reference.forward(
            q, k, v, with_threshold(pattern, threshold), causal=True, scale=dim**-0.5
        )
        assert bool((counts <= previous).all()) and int(counts.min()) >= 1
        previous = counts
    assert int(previous.sum()) < int(computed.sum())


def test_estimate_wraps_the_candidates_with_the_paper_threshold():
    q, k, _ = random_qkv(1, 4, 2, 200, 300, 64, seed=2)
    pattern = sa.estimate(q, k, "blasst", block_q=32, block_k=32)
    assert isinstance(pattern, SkipThresholdPattern)
    assert pattern.skip_threshold == pytest.approx(0.8 / 300)
    dense = sa.estimate(q, k, "dense", block_q=32, block_k=32)
    assert torch.equal(pattern.kv_counts, dense.kv_counts) and torch.equal(pattern.kv_indices, dense.kv_indices)
    assert sa.estimate(q, k, "blasst", threshold=0.25, block_q=32, block_k=32).skip_threshold == 0.25
    assert sa.estimate(q, k, "blasst", threshold_scale=3.0, block_q=32, block_k=32).skip_threshold == 0.01
    assert skip_threshold(BlasstConfig(threshold_scale=1e3), 300) == 1.0  # clamped to a fraction
    options = {"sink_tokens": 32, "local_tokens": 64}
    narrow = sa.estimate(q, k, "blasst", candidates=("streaming", options), block_q=32, block_k=32)
    streaming = sa.estimate(q, k, "streaming", block_q=32, block_k=32, **options)
    assert torch.equal(narrow.kv_counts, streaming.kv_counts)
    assert narrow.density() < pattern.density()
    assert type(pattern.candidates()) is sa.BlockSparsePattern
    with pytest.raises(TypeError, match="union is not defined"):
        pattern.union(dense)


def test_sparse_attention_routes_to_the_rule_and_reports_the_computed_density():
    batch, q_heads, kv_heads, seq, dim, block = 1, 2, 1, 97, 64, 16
    generator = torch.Generator().manual_seed(4)
    q = 0.05 * torch.randn(batch, q_heads, seq, dim, generator=generator)
    k = 0.05 * torch.randn(batch, kv_heads, seq, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    q[..., 0] += dim**0.5
    k[:, :, :block, 0] += 10.0  # a sink every query shares: logit 10 against ~0
    options = dict(block_q=block, block_k=block, threshold=1e-2)
    out, info = sa.sparse_attention(q, k, v, "blasst", return_info=True, **options)
    assert info.backend == "reference"
    pattern = sa.estimate(q, k, "blasst", **options)
    want_out, _, computed = blasst_reference.forward(q, k, v, pattern, causal=True, scale=dim**-0.5)
    assert relative_error(out, want_out) == 0.0
    n_q = pattern.num_q_blocks
    # Diagonal first, then the sink kept, every other block skipped.
    assert computed.tolist() == [[[min(i + 1, 2) for i in range(n_q)]] * q_heads]
    assert info.density == pytest.approx(computed_density(pattern, computed, causal=True))
    assert info.density == pytest.approx((2 * n_q - 1) / (n_q * (n_q + 1) / 2))
    assert info.extras["candidate_density"] == 1.0
    dense = sa.sparse_attention(q, k, v, "dense", block_q=block, block_k=block)
    assert relative_error(out, dense) <= 5e-3
    assert relative_error(sa.sparse_attention(q, k, v, "blasst", **options), out) == 0.0


def test_bad_options():
    with pytest.raises(ValueError, match="threshold must be in"):
        BlasstConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="threshold must be in"):
        BlasstConfig(threshold=1.5)
    with pytest.raises(ValueError, match="threshold must be in"):
        BlasstConfig(threshold=float("nan"))
    with pytest.raises(TypeError, match="threshold must be a float"):
        BlasstConfig(threshold="0.1")
    with pytest.raises(ValueError, match="threshold_scale must be a positive"):
        BlasstConfig(threshold_scale=0.0)
    with pytest.raises(TypeError, match="threshold_scale must be a float"):
        BlasstConfig(threshold_scale=None)
    with pytest.raises(ValueError, match="cannot be 'blasst'"):
        BlasstConfig(candidates="blasst")
    with pytest.raises(ValueError, match="unknown method"):
        BlasstConfig(candidates="nope")
    with pytest.raises(TypeError, match="has no option"):
        BlasstConfig(candidates=("streaming", {"window": 3}))
    with pytest.raises(TypeError, match="candidates must be a method name"):
        BlasstConfig(candidates=["dense"])
    q, k, v = random_qkv(1, 2, 1, 40, 40, 64, seed=0)
    with pytest.raises(ValueError, match="threshold must be in"):
        sa.sparse_attention(q, k, v, "blasst", threshold=2.0)
    with pytest.raises(ValueError, match="skip_threshold must be in"):
        SkipThresholdPattern.over(sa.dense_pattern(seq_q=40, seq_k=40), -1.0)
    masked = MaskedPattern.over_layout(sa.dense_pattern(seq_q=40, seq_k=40), sa.layouts.Layout((40,), tile=(8,)))
    with pytest.raises(ValueError, match="plain block lists"):
        SkipThresholdPattern.over(masked, 0.1)


def test_every_backend_name_runs_the_rule_on_cpu():
    q, k, v = random_qkv(1, 2, 1, 45, 45, 64, seed=9)
    pattern = sa.estimate(q, k, "blasst", threshold=0.05, block_q=16, block_k=16)
    want = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in ("auto", "flex"):
            assert relative_error(sa.block_sparse_attention(q, k, v, pattern, backend=backend), want) == 0.0
