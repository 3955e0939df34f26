"""The public entry points' keywords: check_inputs_finite on sparse_attention, and method options
kept apart from the call's keywords."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import random_qkv

import sparse_attn as sa
from sparse_attn import registry


def test_sparse_attention_checks_inputs_finite_like_block_sparse_attention():
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, seed=0)
    v[0, 0, 7, 1] = float("nan")
    with pytest.raises(ValueError, match="v contains NaN"):
        sa.sparse_attention(q, k, v, method="dense", block_q=16, block_k=16, check_inputs_finite=True)
    with pytest.raises(ValueError, match="v contains NaN"):
        sa.sparse_attention(q, k, v, method="random", density=0.5, block_q=16, block_k=16, check_inputs_finite=True)
    out = sa.sparse_attention(q, k, v, method="dense", block_q=16, block_k=16)
    assert not torch.isfinite(out[0, :, 7:, 1]).any()  # propagated, as documented
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, seed=1)
    out, info = sa.sparse_attention(q, k, v, block_q=16, block_k=16, check_inputs_finite=True, return_info=True)
    assert torch.isfinite(out).all() and info.density == 1.0


@pytest.mark.parametrize(
    "method, options, named",
    [
        ("dense", {"check_input_finite": True}, "its options: none"),
        ("random", {"densty": 0.5}, "'density', 'per_query_head', 'seed'"),
        ("xattention", {"return_lse": True}, "'keep_sink', 'score_precision', 'stride', 'threshold'"),
    ],
)
def test_an_unknown_name_lists_the_method_options_and_the_call_keywords(method, options, named):
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, seed=0)
    with pytest.raises(TypeError) as error:
        sa.sparse_attention(q, k, v, method=method, block_q=16, block_k=16, **options)
    message = str(error.value)
    assert repr(next(iter(options))) in message and repr(method) in message and named in message
    assert "has no option(s)" in message
    assert (
        "sparse_attention() has no keyword of that name (its keywords: q, k, v, method, causal, scale, backend"
        in message
    )
    assert "check_inputs_finite" in message
    with pytest.raises(
        TypeError,
        match=r"estimate\(\) has no keyword of that name \(its keywords: q, k, method, causal, block_q, block_k\)",
    ):
        sa.estimate(q, k, method, block_q=16, block_k=16, **options)


def test_a_call_keyword_is_not_a_method_option():
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, seed=0)
    # backend and check_inputs_finite belong to attention, not to estimation.
    with pytest.raises(TypeError, match=r"no option\(s\) \['backend'\].*estimate\(\) has no keyword"):
        sa.estimate(q, k, "random", density=0.5, block_q=16, block_k=16, backend="reference")
    with pytest.raises(TypeError, match=r"no option\(s\) \['check_inputs_finite'\].*estimate\(\) has no keyword"):
        sa.estimate(q, k, "random", density=0.5, block_q=16, block_k=16, check_inputs_finite=True)


def test_a_method_option_named_like_a_call_keyword_is_refused(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class ShadowingConfig:
        backend: str = "mine"

    def estimate_dense(q, k, config, *, causal, block_q, block_k):
        return sa.dense_pattern(seq_q=q.shape[2], seq_k=k.shape[2], block_q=block_q, block_k=block_k, causal=causal)

    method = registry.Method("shadowing", ShadowingConfig, estimate_dense, paper="-", summary="-")
    monkeypatch.setitem(registry._REGISTRY, "shadowing", method)
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, seed=0)
    with pytest.raises(TypeError, match=r"option\(s\) \['backend'\] named like keywords of sparse_attention\(\)"):
        sa.sparse_attention(q, k, v, method="shadowing", block_q=16, block_k=16)
