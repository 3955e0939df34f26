"""Dynamic estimators: planted structure, pattern properties, config validation, GPU against CPU."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from pathlib import Path

import pytest
import torch

import sparse_attn as sa
from sparse_attn.geometry import num_blocks
from sparse_attn.ops.last_query_probe import probe_last_queries
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


@functools.cache
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
    assert not bool(missing.any()), (
        f"{method} drops planted blocks (head, q block, kv block): {missing.nonzero().tolist()}"
    )


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
    probe = probe_last_queries(q, k, num_queries=16, block_k=16, scale=0.25, causal=True)
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
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(densities)), f"{knob} {values}: {densities}"
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


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_methods_on_gpu_match_cpu_patterns_closely(method):
    q, k, v = planted_inputs()
    cpu = estimate(method, q, k).to_mask()
    gpu = estimate(method, q.cuda(), k.cuda()).to_mask().cpu()
    assert float((cpu != gpu).float().mean()) < 0.02
    out = sa.sparse_attention(q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), method=method)
    assert bool(torch.isfinite(out).all())
