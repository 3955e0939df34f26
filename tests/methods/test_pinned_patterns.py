"""Estimator patterns pinned by hash on fixed planted inputs.

Taken before the operators were reorganised (issue: architecture), so any refactor that
changes a single selected block of any built-in method on these inputs fails here. A
deliberate change of a method's rule updates the hash in the same commit and says why.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from planted import PlantedSpec, planted_qkv

import sparse_attn as sa

# Options that make each method select something non-trivial at 640 tokens and block 32.
CASES = {
    "dense": {},
    "streaming": {"sink_tokens": 32, "local_tokens": 96},
    "tri_shape": {"sink_tokens": 32, "local_tokens": 96, "last_q_tokens": 40},
    "power": {"sink_tokens": 32, "local_tokens": 64},
    "strided_shards": {"local_tokens": 64, "stride": 3},
    "vertical_slash": {"last_q": 32, "vertical_size": 16, "slash_size": 64},
    "block_topk": {"top_k": 4},
    "flexprefill": {"gamma": 0.9, "tau": 0.1, "min_budget": 64},
    "xattention": {"threshold": 0.9, "stride": 8},
    "proxyattn": {"gamma": 0.9, "query_stride": 8},
    "random": {"density": 0.3, "seed": 3},
    # Second wave (issue 18): pinned when added.
    "sale": {"threshold": 0.02, "sink_tokens": 32, "local_tokens": 64},
    "anchor": {"theta": 6.0, "step": 4, "init_tokens": 32, "local_tokens": 32},
    "moa": {"spans": ((32.0, 0.0), (0.0, 0.25), (64.0, 0.1), (16.0, 0.5)), "sink_tokens": 32},
    "hip": {"top_k_tokens": 96, "sink_tokens": 32, "window_tokens": 64},
    "auto": {
        "recall": 0.9,
        "candidates": (
            ("streaming", {"sink_tokens": 32, "local_tokens": 96}),
            ("block_topk", {"top_k": 4}),
            ("xattention", {"threshold": 0.9}),
        ),
    },
}

PINNED = {
    ("block_topk", 300): "023e7d557530dc8f",
    ("block_topk", 640): "071971cd47b3cfbb",
    ("dense", 300): "94efdd2f096ec33e",
    ("dense", 640): "af09edba6b37fe3d",
    ("flexprefill", 300): "d63e9dba447dac08",
    ("flexprefill", 640): "ac121ede575baebc",
    ("power", 300): "67439d39747c1242",
    ("power", 640): "040a9a5107c8a4d9",
    ("proxyattn", 300): "21d9f1ee25756095",
    ("proxyattn", 640): "bcd01adcc2a81251",
    ("random", 300): "d18f9d4a4409c23b",
    ("random", 640): "0553b8dbd19c5c59",
    ("streaming", 300): "17c77a0163eb804e",
    ("streaming", 640): "b71bba403ead758f",
    ("strided_shards", 300): "b958e9ceeac95aa7",
    ("strided_shards", 640): "6dda77b179ffcaec",
    ("tri_shape", 300): "e0c2665ae8894b00",
    ("tri_shape", 640): "29b526ac8704c7dc",
    ("vertical_slash", 300): "22442024a72a8ad0",
    ("vertical_slash", 640): "6c08f8477c27ba9d",
    ("xattention", 300): "7603c61ee2949244",
    ("xattention", 640): "7257d5cc4e29f8cb",
    ("sale", 300): "707d812d44ed9d76",
    ("sale", 640): "d48f20d91a6690fa",
    ("anchor", 300): "5f2318bf52d29dda",
    ("anchor", 640): "a27a4ea8fd91efac",
    ("moa", 300): "d22bfef36887d300",
    ("moa", 640): "ffed8ca8488beb63",
    ("auto", 300): "7603c61ee2949244",
    ("auto", 640): "071971cd47b3cfbb",  # the spread probe became the default (issue 18): 300 unchanged
    ("hip", 300): "38055b113b4715cf",
    ("hip", 640): "6d284724398c75f7",
}


def _digest(pattern: sa.BlockSparsePattern) -> str:
    used = torch.arange(pattern.max_kv) < pattern.kv_counts[..., None]
    indices = torch.where(used, pattern.kv_indices, -1)
    header = f"{tuple(pattern.kv_counts.shape)}|{pattern.block_q}|{pattern.block_k}|{pattern.seq_q}|{pattern.seq_k}"
    h = hashlib.sha256(header.encode())
    h.update(pattern.kv_counts.contiguous().numpy().tobytes())
    h.update(indices.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _inputs(seq_q: int):
    spec = PlantedSpec(batch=2, q_heads=4, kv_heads=2, seq_q=seq_q, seq_k=640, dim=128, block=32, seed=11)
    q, k, _ = planted_qkv(spec)
    return q, k


@pytest.mark.parametrize("seq_q", [640, 300])
@pytest.mark.parametrize("method", sorted(CASES))
def test_pattern_is_pinned(method, seq_q):
    q, k = _inputs(seq_q)
    pattern = sa.estimate(q, k, method, block_q=32, block_k=32, **CASES[method])
    assert _digest(pattern) == PINNED[(method, seq_q)]
