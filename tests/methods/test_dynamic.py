"""Dynamic estimators: planted structure, pattern properties, shared machinery, Triton scoring."""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import pytest
import torch

import sparse_attn as sa
from sparse_attn.methods import _common
from sparse_attn.methods._scoring_triton import antidiagonal_block_probs_triton
from sparse_attn.geometry import causal_block_mask, num_blocks
from sparse_attn.pattern import BlockSparsePattern

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import naive_attention, random_qkv, relative_error  # noqa: E402
from planted import PlantedSpec, planted_blocks, planted_qkv  # noqa: E402

METHODS = ("block_topk", "vertical_slash", "flexprefill", "xattention", "proxyattn")

# Per method, one knob from loosest to tightest (density must not increase along it).
SWEEPS = {
    "block_topk": ("top_k", [100, 8, 4, 2, 1]),
    "vertical_slash": ("vertical_size", [1000, 64, 8, 2, 0]),
    "flexprefill": ("gamma", [1.0, 0.95, 0.9, 0.7, 0.3]),
    "xattention": ("threshold", [1.0, 0.95, 0.9, 0.7, 0.3]),
    "proxyattn": ("gamma", [1.0, 0.95, 0.9, 0.7, 0.3]),
}
SWEEP_FIXED = {"vertical_slash": {"slash_size": 8}, "flexprefill": {"min_budget": 0}}

# Tight settings: the planted structure should be about all that is kept.
TIGHT = {
    "block_topk": {"top_k": 4},
    "vertical_slash": {"vertical_size": 4, "slash_size": 4},
    "flexprefill": {"gamma": 0.5, "min_budget": 0},
    "xattention": {"threshold": 0.5},
    "proxyattn": {"gamma": 0.5},
}

# GQA 4/1 and heads of a group agreeing on their needle: ProxyAttn's premise (its proxy
# pools the group's queries), harmless for the per-head methods.
PLANTED = PlantedSpec(needle_shared_by_group=True)


@functools.lru_cache(maxsize=None)
def planted_inputs(spec: PlantedSpec = PLANTED):
    return planted_qkv(spec)


def estimate(method, q, k, block=16, **options) -> BlockSparsePattern:
    return sa.estimate(q, k, method, block_q=block, block_k=block, **options)


# Planted structure -------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_defaults_keep_planted_blocks(method):
    q, k, _ = planted_inputs()
    kept = estimate(method, q, k).to_mask()[0]
    missing = planted_blocks(PLANTED) & ~kept
    assert not bool(missing.any()), f"{method} drops planted blocks (head, q block, kv block): {missing.nonzero().tolist()}"


@pytest.mark.parametrize("method", METHODS)
def test_tight_setting_keeps_little_beyond_planted(method):
    q, k, _ = planted_inputs()
    pattern = estimate(method, q, k, **TIGHT[method])
    kept = pattern.to_mask()[0]
    extra = (kept & ~planted_blocks(PLANTED)).sum() / kept.sum()
    assert float(extra) <= 0.25, f"{method}: {float(extra):.2f} of the kept blocks are not planted"
    assert pattern.density() <= 0.3
    # What is kept is still most of the attention: the estimate ranks the structure first.
    assert sa.metrics.recall(q, k, pattern) >= 0.7


def test_xattention_density_falls_with_the_threshold():
    q, k, _ = planted_inputs()
    loose = estimate("xattention", q, k).density()
    tight = estimate("xattention", q, k, threshold=0.3).density()
    assert tight < 0.5 * loose


def test_flexprefill_recall_on_planted_inputs_is_high_at_low_density():
    q, k, _ = planted_inputs()
    pattern = estimate("flexprefill", q, k, min_budget=0)
    assert pattern.density() < 0.6
    assert sa.metrics.recall(q, k, pattern) > 0.95


def test_flexprefill_heads_of_both_kinds_take_their_own_masks():
    from sparse_attn.methods import flexprefill

    q, k, _ = random_qkv(2, 4, 2, 160, 160, 16, seed=12)
    probe = _common.probe_last_queries(q, k, num_queries=16, block_k=16, scale=0.25, causal=True)
    estimated = flexprefill.pooled_last_block_distribution(q, k, num_queries=16, block_k=16)
    distance = flexprefill.jensen_shannon_distance(probe.block / probe.num_queries, estimated)
    tau = float(distance.flatten().sort().values[3:5].mean())  # splits the 8 (batch, head) pairs
    query_aware = distance < tau
    assert 0 < int(query_aware.sum()) < query_aware.numel()
    options = dict(gamma=0.6, min_budget=0)
    mixed = estimate("flexprefill", q, k, tau=tau, **options).to_mask()
    all_aware = estimate("flexprefill", q, k, tau=1.0, **options).to_mask()
    all_lines = estimate("flexprefill", q, k, tau=0.0, **options).to_mask()
    assert not torch.equal(all_aware, all_lines)
    assert torch.equal(mixed, torch.where(query_aware[..., None, None], all_aware, all_lines))


# Properties of every method ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_density_non_decreasing_as_the_budget_loosens(method):
    q, k, _ = planted_inputs()
    knob, values = SWEEPS[method]
    densities = [estimate(method, q, k, **{knob: value}, **SWEEP_FIXED.get(method, {})).density() for value in values]
    assert all(a >= b - 1e-9 for a, b in zip(densities, densities[1:])), f"{knob} {values}: {densities}"
    assert densities[0] > densities[-1]


@pytest.mark.parametrize("method", METHODS)
def test_deterministic(method):
    q, k, _ = planted_inputs()
    first, second = estimate(method, q, k), estimate(method, q, k)
    assert torch.equal(first.kv_counts, second.kv_counts)
    assert torch.equal(first.kv_indices, second.kv_indices)


SHAPES = [
    # batch, q_heads, kv_heads, seq_q, seq_k, block
    pytest.param(2, 4, 1, 96, 96, 16, id="batch2-gqa4"),
    pytest.param(1, 8, 2, 80, 200, 16, id="gqa4-chunked-prefill-tails"),
    pytest.param(1, 2, 2, 37, 101, 32, id="mha-odd-lengths"),
    pytest.param(1, 4, 4, 130, 130, 64, id="block64-tail"),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch, q_heads, kv_heads, seq_q, seq_k, block", SHAPES)
def test_valid_patterns_on_any_shape(method, batch, q_heads, kv_heads, seq_q, seq_k, block):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 64, seed=1)
    # Structure in the keys so that the methods do not all go dense.
    k[:, :, :4] *= 6.0
    for causal in (True, False):
        pattern = sa.estimate(q, k, method, causal=causal, block_q=block, block_k=block, **TIGHT[method])
        assert pattern.kv_counts.shape == (batch, q_heads, num_blocks(seq_q, block))
        pattern.validate(causal=causal)
        if causal:  # validate() checks diagonals; also the first block of every row was reachable
            assert bool(pattern.to_mask()[..., -1, :].any(-1).all())


def test_batches_are_estimated_independently():
    q, k, _ = planted_inputs()
    other_q, other_k, _ = planted_qkv(dataclasses.replace(PLANTED, seed=3, vertical_position=300))
    both = estimate("xattention", torch.cat([q, other_q]), torch.cat([k, other_k])).to_mask()
    assert torch.equal(both[0], estimate("xattention", q, k).to_mask()[0])
    assert torch.equal(both[1], estimate("xattention", other_q, other_k).to_mask()[0])


@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_sparse_attention_on_cpu(method):
    q, k, v = random_qkv(1, 4, 2, 64, 96, 32, seed=2)
    out, info = sa.sparse_attention(q, k, v, method=method, block_q=16, block_k=16, return_info=True)
    expected, _ = naive_attention(q, k, v, info.pattern, causal=True)
    assert out.shape == q.shape
    assert relative_error(out, expected) < 1e-4


@pytest.mark.parametrize(
    "method, field, value, error",
    [
        ("block_topk", "top_k", 0, ValueError),
        ("block_topk", "threshold", 1.5, ValueError),
        ("vertical_slash", "last_q", 1.0, TypeError),
        ("flexprefill", "gamma", 0.0, ValueError),
        ("flexprefill", "tau", "x", TypeError),
        ("flexprefill", "min_budget", -1, ValueError),
        ("xattention", "stride", True, TypeError),
        ("xattention", "threshold", float("nan"), ValueError),
        ("proxyattn", "query_stride", 0, ValueError),
        ("proxyattn", "proxy_heads", 1.5, TypeError),
    ],
)
def test_config_validation_names_the_field(method, field, value, error):
    with pytest.raises(error, match=field):
        sa.get_method(method).make_config(**{field: value})


def test_xattention_rejects_blocks_not_multiple_of_stride():
    q, k, _ = random_qkv(1, 2, 2, 40, 40, 16, seed=0)
    with pytest.raises(ValueError, match="multiple of stride"):
        sa.estimate(q, k, "xattention", block_q=12, block_k=16)


def test_proxyattn_rejects_proxy_heads_that_do_not_divide():
    q, k, _ = random_qkv(1, 8, 2, 32, 32, 16, seed=0)
    with pytest.raises(ValueError, match="proxy_heads"):
        sa.estimate(q, k, "proxyattn", block_q=16, block_k=16, proxy_heads=3)


# Shared machinery against brute force ------------------------------------------------------
def test_mean_pool_blocks_averages_real_positions_only():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    pooled = _common.mean_pool_blocks(x, 4)
    assert torch.allclose(pooled.flatten(), torch.tensor([1.5, 5.5, 8.5]))


def test_probe_sums_match_brute_force():
    q, k, _ = random_qkv(1, 4, 2, 24, 40, 16, seed=4)
    scale = 0.25
    sums = _common.probe_last_queries(q, k, num_queries=8, block_k=16, scale=scale, causal=True)
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


@pytest.mark.parametrize("seq_q, seq_k, block_q, block_k", [(40, 40, 8, 8), (30, 70, 8, 16), (33, 50, 16, 8)])
def test_vertical_slash_block_mask_matches_token_level_lines(seq_q, seq_k, block_q, block_k):
    generator = torch.Generator().manual_seed(seq_q)
    vertical = torch.rand(1, 1, seq_k, generator=generator) < 0.05
    slash = torch.rand(1, 1, seq_k, generator=generator) < 0.05
    got = _common.vertical_slash_block_mask(
        vertical, slash, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k
    )[0, 0]
    positions = torch.arange(seq_q) + seq_k - seq_q
    keys = torch.arange(seq_k)
    distance = positions[:, None] - keys[None, :]
    visible = distance >= 0
    on_line = vertical[0, 0][None, :] | slash[0, 0][distance.clamp(min=0)]
    tokens = (on_line & visible).float()
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    padded = torch.nn.functional.pad(tokens, (0, n_kv * block_k - seq_k, 0, n_q * block_q - seq_q))
    expected = padded.view(n_q, block_q, n_kv, block_k).sum((1, 3)) > 0
    assert torch.equal(got, expected)


def test_cumulative_mass_mask_keeps_fewest_entries_with_budgets():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert _common.cumulative_mass_mask(scores, 0.8).tolist() == [[True, False, True, False], [True, True, True, True]]
    capped = _common.cumulative_mass_mask(scores, 0.8, _common.Budget(minimum=1, maximum=2))
    assert capped.tolist() == [[True, False, True, False], [True, True, False, False]]
    floor = _common.cumulative_mass_mask(scores, 0.1, _common.Budget(minimum=3))
    assert floor.sum(-1).tolist() == [3, 3]


def test_cumulative_mass_mask_on_long_rows_scans_in_pieces():
    # Rows past 64K entries take the piecewise scan; it must pick what a float64 scan picks.
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 70_001, generator=generator) ** 8
    got = _common.cumulative_mass_mask(scores, 0.7)
    values, order = torch.sort(scores.double(), dim=-1, descending=True, stable=True)
    cumulative = values.cumsum(-1)
    keep = ((cumulative - values) < 0.7 * cumulative[:, -1:]).sum(-1)
    assert got.sum(-1).tolist() == keep.tolist()
    assert torch.equal(got, torch.zeros_like(got).scatter_(-1, order, torch.arange(70_001) < keep[:, None]))
    assert torch.allclose(_common._row_cumsum(scores), scores.double().cumsum(-1).float(), rtol=1e-5)


def test_vertical_slash_block_mask_in_head_chunks_matches_whole(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    vertical = torch.rand(2, 5, 300, generator=generator) < 0.03
    slash = torch.rand(2, 5, 300, generator=generator) < 0.03
    whole = _common.vertical_slash_block_mask(vertical, slash, seq_q=260, seq_k=300, block_q=16, block_k=32)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 8 * 2 * 17 * 10 * 2)  # two heads per chunk
    chunked = _common.vertical_slash_block_mask(vertical, slash, seq_q=260, seq_k=300, block_q=16, block_k=32)
    assert torch.equal(chunked, whole)


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
    last_query, first_key = _common.antidiagonal_visibility(seq_q, k.shape[2], stride, causal=causal, device="cpu")
    logits = (sums * scale / stride).masked_fill(first_key[None, :] > last_query[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    n_kv = num_blocks(k.shape[2], block_k)
    per_block = torch.nn.functional.pad(probs, (0, n_kv * (block_k // stride) - k_cells))
    per_block = per_block.view(batch, q_heads, q_cells, n_kv, -1).sum(-1)
    return _common.cells_to_block_probs(per_block, block_q // stride).float()


ANTIDIAGONAL_CASES = [
    # batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype
    pytest.param(1, 4, 2, 100, 130, 16, 4, 16, 32, True, torch.float32, id="gqa-chunked-tails"),
    pytest.param(2, 2, 1, 64, 64, 32, 8, 32, 32, True, torch.bfloat16, id="bf16-batch2"),
    pytest.param(1, 2, 2, 50, 77, 16, 4, 16, 16, False, torch.float32, id="non-causal"),
    pytest.param(1, 2, 1, 96, 96, 16, 8, 64, 16, True, torch.float32, id="large-q-block"),
    pytest.param(1, 1, 1, 1100, 1100, 16, 8, 32, 16, True, torch.float32, id="more-kv-blocks-than-epilogue-tile"),
]


@pytest.mark.parametrize("batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype", ANTIDIAGONAL_CASES)
def test_antidiagonal_reference_and_triton_match_brute_force(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, stride, block_q, block_k, causal, dtype
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype, seed=5)
    scale = dim**-0.5
    expected = _brute_force_antidiagonal(q.float(), k.float(), stride, block_q, block_k, scale, causal)
    options = dict(stride=stride, block_q=block_q, block_k=block_k, scale=scale, causal=causal)
    reference = _common.antidiagonal_block_probs_reference(q, k, **options)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(reference, expected, atol=tolerance)
    with _quiet_numpy():
        triton_probs = antidiagonal_block_probs_triton(q, k, **options)
    assert torch.allclose(triton_probs, expected, atol=tolerance)


def _quiet_numpy():
    """The interpreter evaluates log2(0) for blocks with nothing visible (-inf, as intended)."""
    import numpy as np

    return np.errstate(divide="ignore")


def test_scoring_kernel_in_query_cell_chunks_matches_one_launch(monkeypatch):
    # Very long sequences split one head's query cells over several launches; forced here
    # with a tiny scratch budget and chunk unit.
    from sparse_attn.methods import _scoring_triton

    q, k, _ = random_qkv(2, 2, 1, 200, 232, 16, dtype=torch.float32, seed=13)
    antidiagonal = dict(stride=4, block_q=16, block_k=16, scale=0.25, causal=True)
    sampled = dict(seq_q=200, query_step=4, block_q=16, block_k=16, scale=0.25, causal=True)
    q_rows = q[:, :, 3::4]
    with _quiet_numpy():
        whole = antidiagonal_block_probs_triton(q, k, **antidiagonal)
        whole_sampled = _scoring_triton.sampled_rows_block_max_probs_triton(q_rows, k, **sampled)
        monkeypatch.setattr(_scoring_triton, "CHUNK_ELEMENTS", 400)
        monkeypatch.setattr(_scoring_triton, "_CELL_UNIT", 32)
        chunked = antidiagonal_block_probs_triton(q, k, **antidiagonal)
        chunked_sampled = _scoring_triton.sampled_rows_block_max_probs_triton(q_rows, k, **sampled)
    assert torch.equal(chunked, whole)
    assert torch.equal(chunked_sampled, whole_sampled)


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
    batch, q_heads, kv_heads, seq_q, seq_k, step, block_q, block_k, causal, dtype
):
    from sparse_attn.methods._scoring_triton import sampled_rows_block_max_probs_triton

    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, dtype=dtype, seed=9)
    rows = _common.sampled_query_rows(seq_q, block_q, step, "cpu")
    assert torch.equal(rows, torch.arange(step - 1, seq_q, step))
    q_rows = q[:, :, rows]
    expected = _common.max_row_block_probs(
        q_rows.float(), rows + (seq_k - seq_q), k.float(), row_blocks=rows // block_q,
        n_q=num_blocks(seq_q, block_q), block_k=block_k, scale=0.25, causal=causal,
    )  # fmt: skip
    with _quiet_numpy():
        got = sampled_rows_block_max_probs_triton(
            q_rows, k, seq_q=seq_q, query_step=step, block_q=block_q, block_k=block_k, scale=0.25, causal=causal
        )
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got, expected, atol=tolerance)


@pytest.mark.gpu
def test_sampled_row_kernel_matches_reference_on_gpu():
    from sparse_attn.methods._scoring_triton import sampled_rows_block_max_probs_triton

    seq, step = 8192, 16
    q, k, _ = random_qkv(1, 8, 8, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=10)
    rows = _common.sampled_query_rows(seq, 128, step, "cuda")
    expected = _common.max_row_block_probs(
        q[:, :, rows], rows, k, row_blocks=rows // 128, n_q=seq // 128, block_k=128, scale=128**-0.5, causal=True
    )
    got = sampled_rows_block_max_probs_triton(
        q[:, :, rows], k, seq_q=seq, query_step=step, block_q=128, block_k=128, scale=128**-0.5, causal=True
    )
    assert torch.allclose(got, expected, atol=2e-3)


def test_sampled_row_kernel_refuses_irregular_rows():
    from sparse_attn.methods._scoring_triton import sampled_rows_triton_unsupported_reason

    q_rows = torch.zeros(1, 1, 7, 16)
    reason = sampled_rows_triton_unsupported_reason(q_rows, seq_q=100, query_step=16, block_q=64, block_k=64)
    assert reason is not None and "every 16-th query" in reason


def test_antidiagonal_triton_in_head_chunks_matches_one_chunk(monkeypatch):
    from sparse_attn.methods import _scoring_triton

    q, k, _ = random_qkv(2, 4, 2, 70, 90, 16, dtype=torch.float32, seed=8)
    options = dict(stride=4, block_q=16, block_k=16, scale=0.25, causal=True)
    with _quiet_numpy():
        whole = antidiagonal_block_probs_triton(q, k, **options)
        monkeypatch.setattr(_scoring_triton, "CHUNK_ELEMENTS", 2 * 18 * 6 * 3)  # three heads, then one
        chunked = antidiagonal_block_probs_triton(q, k, **options)
    assert torch.equal(chunked, whole)


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [4096, 16384])
def test_antidiagonal_triton_matches_reference_on_gpu(seq):
    q, k, _ = random_qkv(1, 8, 2, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=6)
    options = dict(stride=8, block_q=128, block_k=128, scale=128**-0.5, causal=True)
    reference = _common.antidiagonal_block_probs_reference(q, k, **options)
    triton_probs = antidiagonal_block_probs_triton(q, k, **options)
    assert torch.allclose(triton_probs, reference, atol=2e-3)
    valid = causal_block_mask(seq, seq, 128, 128, "cuda")
    assert torch.allclose(triton_probs.sum(-1), torch.ones_like(triton_probs[..., 0]), atol=1e-3)
    assert bool((triton_probs[..., ~valid] == 0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_methods_on_gpu_match_cpu_patterns_closely(method):
    q, k, v = planted_inputs()
    cpu = estimate(method, q, k).to_mask()
    gpu = estimate(method, q.cuda(), k.cuda()).to_mask().cpu()
    assert float((cpu != gpu).float().mean()) < 0.02
    out = sa.sparse_attention(q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), method=method)
    assert bool(torch.isfinite(out).all())


def test_probe_chunking_within_a_gqa_group_matches_unchunked(monkeypatch):
    q, k, _ = random_qkv(1, 8, 2, 40, 70, 16, seed=7)
    whole = _common.probe_last_queries(q, k, num_queries=8, block_k=16, scale=0.25, causal=True)
    monkeypatch.setattr(_common, "CHUNK_ELEMENTS", 64)  # one query head per chunk
    chunked = _common.probe_last_queries(q, k, num_queries=8, block_k=16, scale=0.25, causal=True)
    assert torch.allclose(whole.vertical, chunked.vertical) and torch.allclose(whole.slash, chunked.slash)
