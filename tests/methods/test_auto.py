"""auto: the per-head choice against a brute force of its rule, the recall budget on planted inputs
(exact recall), dense fallback, the cached state, candidate validation."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from helpers import naive_attention, random_qkv, relative_error
from planted import PlantedSpec, planted_qkv

import sparse_attn as sa
from sparse_attn.methods.auto import DENSE, AutoConfig, AutoState, auto_layer_methods, choose

PLANTED = PlantedSpec(needle_shared_by_group=True)
CANDIDATES = (
    ("streaming", {"sink_tokens": 16, "local_tokens": 64}),
    ("block_topk", {"top_k": 4}),
    ("block_topk", {"top_k": 8}),
    ("xattention", {"threshold": 0.9}),
    ("xattention", {"threshold": 0.5}),
    ("sale", {"sink_tokens": 16, "local_tokens": 16}),
)
BLOCKS = dict(block_q=16, block_k=16)


@functools.cache
def planted_inputs():
    return planted_qkv(PLANTED)


def head_recall(q, k, pattern, head):
    group = q.shape[1] // k.shape[1]
    per_head = pattern.expand_heads(q.shape[1])
    one = sa.BlockSparsePattern(
        kv_counts=per_head.kv_counts[:, head : head + 1].contiguous(),
        kv_indices=per_head.kv_indices[:, head : head + 1].contiguous(),
        block_q=pattern.block_q,
        block_k=pattern.block_k,
        seq_q=pattern.seq_q,
        seq_k=pattern.seq_k,
    )
    return sa.metrics.recall(q[:, head : head + 1], k[:, head // group : head // group + 1], one)


def probe_recall_brute_force(q, k, pattern, probe_rows):
    """Exact softmax of the last probe rows, the mass inside the last query block's kept blocks, per head."""
    group = q.shape[1] // k.shape[1]
    seq_q, seq_k = q.shape[2], k.shape[2]
    logits = (
        q[:, :, -probe_rows:].double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    )
    positions = torch.arange(seq_q - probe_rows, seq_q) + seq_k - seq_q
    logits = logits.masked_fill(torch.arange(seq_k)[None, :] > positions[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    kept = pattern.expand_heads(q.shape[1]).to_mask()[:, :, -1]  # (B', H, n_kv)
    keys = kept.repeat_interleave(pattern.block_k, -1)[..., :seq_k]
    return (probs * keys[:, :, None, :]).sum(-1).mean(-1)


@pytest.mark.parametrize("budget", [0.9, 0.95])
def test_auto_meets_its_budget_at_lower_density_than_dense(budget):
    q, k, _ = planted_inputs()
    pattern, choice = choose(q, k, AutoConfig(recall=budget, candidates=CANDIDATES), causal=True, **BLOCKS)
    pattern.validate()
    assert pattern.density() < 0.6
    assert sa.metrics.recall(q, k, pattern) >= budget
    for head in range(q.shape[1]):
        assert head_recall(q, k, pattern, head) >= budget - 0.02, f"head {head}: {choice.names()[head]}"
    assert DENSE not in choice.index.tolist()


def test_choice_is_the_sparsest_candidate_meeting_the_budget():
    q, k, _ = random_qkv(2, 6, 3, 96, 112, 32, seed=4)
    k[:, :, 5] *= 5.0
    budget = 0.85
    pattern, choice = choose(
        q, k, AutoConfig(recall=budget, candidates=CANDIDATES, probe_queries=8), causal=True, **BLOCKS
    )
    valid = sa.dense_pattern(seq_q=96, seq_k=112, **BLOCKS).kv_counts.sum().item()
    best = torch.full((2, 6), float("inf"))
    index = torch.full((2, 6), DENSE)
    for position, (name, options) in enumerate(CANDIDATES):
        candidate = sa.estimate(q, k, name, **BLOCKS, **options)
        recall = probe_recall_brute_force(q, k, candidate, 8).expand(2, 6)
        density = candidate.expand_heads(6).kv_counts.sum(-1).double().expand(2, 6) / valid
        better = (recall >= budget - 1e-6) & (density < best - 1e-12)
        best = torch.where(better, density, best)
        index = torch.where(better, position, index)
    assert torch.equal(choice.index, index)
    # The pattern's rows are the chosen candidates' rows.
    for position in index.unique().tolist():
        if position == DENSE:
            continue
        name, options = CANDIDATES[position]
        rows = sa.estimate(q, k, name, **BLOCKS, **options).expand_heads(6).to_mask().expand(2, -1, -1, -1)
        heads = index == position
        assert torch.equal(pattern.to_mask()[heads], rows[heads])


def test_heads_no_candidate_serves_run_dense():
    q, k, _ = planted_inputs()
    narrow = (("streaming", {"sink_tokens": 16, "local_tokens": 16}),)
    pattern, choice = choose(q, k, AutoConfig(recall=0.999, candidates=narrow), causal=True, **BLOCKS)
    assert choice.names() == ["dense"] * 4
    assert pattern.density() == 1.0
    assert torch.equal(choice.density, torch.ones(1, 4))


def test_state_reuses_the_choice_until_the_refresh():
    q, k, _ = planted_inputs()
    state = AutoState(refresh_every=3)
    config = AutoConfig(recall=0.9, candidates=CANDIDATES, state=state)
    first, _ = choose(q, k, config, causal=True, **BLOCKS)
    flags = [state.last.refreshed]
    for _ in range(3):
        again, _ = choose(q, k, config, causal=True, **BLOCKS)
        flags.append(state.last.refreshed)
        assert torch.equal(again.to_mask(), first.to_mask())
    assert flags == [True, False, False, True]
    # A different head count re-selects.
    choose(q[:, :2], k, config, causal=True, **BLOCKS)
    assert state.last.refreshed and state.last.index.shape == (1, 2)


def test_auto_through_the_api_matches_the_oracle_and_layer_methods_get_their_own_state():
    q, k, v = random_qkv(1, 4, 2, 64, 96, 32, seed=2)
    out, info = sa.sparse_attention(q, k, v, method="auto", candidates=CANDIDATES[:3], return_info=True, **BLOCKS)
    expected, _ = naive_attention(q, k, v, info.pattern, causal=True)
    assert relative_error(out, expected) < 1e-4
    methods = auto_layer_methods([0, 3], refresh_every=4, recall=0.9)
    assert methods[0][0] == "auto" and methods[0][1]["recall"] == 0.9
    assert methods[0][1]["state"] is not methods[3][1]["state"]


def test_candidates_that_cannot_run_the_case_are_skipped_with_a_warning():
    q, k, _ = random_qkv(1, 2, 2, 40, 40, 16, seed=0)
    with pytest.warns(UserWarning, match="xattention.*skipped"):
        pattern = sa.estimate(q, k, "auto", block_q=12, block_k=12, candidates=("xattention", "streaming"))
    pattern.validate()


@pytest.mark.parametrize(
    "candidates, error, match",
    [
        (("auto",), ValueError, "auto"),
        (("nonexistent",), ValueError, "unknown method"),
        ((("xattention", {"bogus": 1}),), TypeError, "bogus"),
        ((), ValueError, "at least one"),
        ("streaming", TypeError, "candidates"),
        ((("streaming", 3),), TypeError, "candidates"),
    ],
)
def test_bad_candidates_are_rejected(candidates, error, match):
    with pytest.raises(error, match=match):
        AutoConfig(candidates=candidates)


def test_other_config_errors_name_the_field():
    with pytest.raises(ValueError, match="recall"):
        AutoConfig(recall=1.5)
    with pytest.raises(ValueError, match="probe_queries"):
        AutoConfig(probe_queries=0)
    with pytest.raises(TypeError, match="state"):
        AutoConfig(state="cache")
    with pytest.raises(ValueError, match="refresh_every"):
        AutoState(refresh_every=0)


def test_token_level_candidates_are_rejected():
    q, k, _ = random_qkv(1, 2, 2, 40, 40, 16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="block_q"):
            sa.estimate(q, k, "auto", candidates=(("moba", {"block_size": 8, "top_k": 2}),), **BLOCKS)
