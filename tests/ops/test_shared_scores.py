"""Scores shared within a scope: computed once per key there, always outside; xattention's thresholds share them."""

from __future__ import annotations

import torch
from helpers import random_qkv

import sparse_attn as sa
from sparse_attn.ops._shared_scores import memoized, shared_scores, tensor_key


def test_memoized_computes_once_per_key_in_a_scope_and_always_outside():
    x = torch.randn(4, 8)
    calls = []

    def compute():
        calls.append(1)
        return x.sum()

    memoized(("sum", tensor_key(x)), compute, (x,))
    memoized(("sum", tensor_key(x)), compute, (x,))
    assert len(calls) == 2  # no scope: no sharing
    with shared_scores():
        first = memoized(("sum", tensor_key(x)), compute, (x,))
        with shared_scores():  # a nested scope shares the outer one
            again = memoized(("sum", tensor_key(x)), compute, (x,))
        assert again is first and len(calls) == 3
        x.add_(1.0)  # an in-place change is a new version: a new key
        changed = memoized(("sum", tensor_key(x)), compute, (x,))
        assert len(calls) == 4 and torch.allclose(changed, first + 32)
    memoized(("sum", tensor_key(x)), compute, (x,))
    assert len(calls) == 5  # the scope ended


def test_keys_of_inference_tensors_have_no_version():
    with torch.inference_mode():
        x = torch.randn(3)
        assert tensor_key(x)[-1] is None
        with shared_scores():
            assert memoized(("x", tensor_key(x)), lambda: x * 2, (x,)).shape == (3,)
        with torch.inference_mode():
            sa.estimate(torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16), "xattention", block_q=16, block_k=16)


def test_xattention_thresholds_share_their_scores_in_a_scope(monkeypatch):
    import sparse_attn.methods.xattention as xattention

    q, k, _ = random_qkv(2, 4, 2, 130, 150, 32, seed=3)
    expected = [sa.estimate(q, k, "xattention", threshold=t, block_q=16, block_k=16).to_mask() for t in (0.5, 0.9)]
    calls = []
    original = xattention.antidiagonal_block_probs

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(xattention, "antidiagonal_block_probs", counting)
    with shared_scores():
        found = [sa.estimate(q, k, "xattention", threshold=t, block_q=16, block_k=16).to_mask() for t in (0.5, 0.9)]
    in_scope = len(calls)
    assert in_scope >= 1
    sa.estimate(q, k, "xattention", threshold=0.5, block_q=16, block_k=16)  # one estimate outside a scope
    assert len(calls) == 2 * in_scope  # so the two thresholds in the scope scored as one estimate
    for a, b in zip(found, expected, strict=True):
        assert torch.equal(a, b)
