"""Every malformed input to the public functions fails early with an error naming the argument."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import random_qkv, relative_error

import sparse_attn as sa


def _inputs(batch=1, q_heads=4, kv_heads=2, seq_q=64, seq_k=64, dim=64, dtype=torch.float32):
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype, seed=0)
    pattern = sa.dense_pattern(heads=kv_heads, seq_q=seq_q, seq_k=seq_k, block_q=16, block_k=16)
    return q, k, v, pattern


def _replace(which, value):
    q, k, v, pattern = _inputs()
    tensors = {"q": q, "k": k, "v": v}
    tensors[which] = value
    return tensors["q"], tensors["k"], tensors["v"], pattern


CASES = [
    ("q is 3-d", lambda: _replace("q", torch.randn(4, 64, 64)), ValueError, "q must have 4 dimensions"),
    ("k is 5-d", lambda: _replace("k", torch.randn(1, 2, 64, 64, 1)), ValueError, "k must have 4 dimensions"),
    ("q not a tensor", lambda: _replace("q", [[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("int dtype", lambda: _replace("v", torch.ones(1, 2, 64, 64, dtype=torch.int64)), TypeError, "v must be float16"),
    ("batch mismatch", lambda: _replace("k", torch.randn(2, 2, 64, 64)), ValueError, "k must have q's batch size"),
    ("head_dim mismatch", lambda: _replace("k", torch.randn(1, 2, 64, 32)), ValueError, "k must have q's head_dim"),
    ("v shape", lambda: _replace("v", torch.randn(1, 2, 63, 64)), ValueError, "v must have k's shape"),
    ("Hq % Hkv", lambda: _replace("k", torch.randn(1, 3, 64, 64)), ValueError, "multiple of the number of KV heads"),
    (
        "k dtype",
        lambda: _replace("k", torch.randn(1, 2, 64, 64, dtype=torch.float16)),
        TypeError,
        "k must have q's dtype",
    ),
    (
        "v dtype",
        lambda: _replace("v", torch.randn(1, 2, 64, 64, dtype=torch.float64)),
        TypeError,
        "v must have q's dtype",
    ),
    ("Sk < Sq", lambda: _replace("q", torch.randn(1, 4, 80, 64)), ValueError, "seq_k=64 < seq_q=80"),
    ("empty q", lambda: _replace("q", torch.randn(1, 4, 0, 64)), ValueError, "empty sequence"),
    (
        "zero batch",
        lambda: (lambda t: (t, t[:, :2], t[:, :2], _inputs()[3]))(torch.randn(0, 4, 64, 64)),
        ValueError,
        "nonzero batch",
    ),
]


@pytest.mark.parametrize("make, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_tensors_raise_named_errors(make, error, message):
    q, k, v, pattern = make()
    with pytest.raises(error, match=message):
        sa.block_sparse_attention(q, k, v, pattern)
    if message.startswith(("q ", "k ")) or "k must" in message or "KV heads" in message or "seq_k" in message:
        with pytest.raises(error, match=message):
            sa.estimate(q, k, "dense")


def test_device_mismatch_is_named():
    q, k, v, pattern = _inputs()
    with pytest.raises(ValueError, match="k must be on q's device"):
        sa.block_sparse_attention(q, k.to("meta"), v, pattern)
    with pytest.raises(ValueError, match="pattern is on"):
        sa.block_sparse_attention(q, k, v, pattern.to("meta"))


@pytest.mark.parametrize(
    "pattern_kwargs, message",
    [
        (dict(seq_q=48, seq_k=64), "pattern is for seq_q=48"),
        (dict(seq_q=64, seq_k=80), "seq_k=80"),
        (dict(batch=3), "pattern batch must be 1 or the batch size 2"),
        (dict(heads=3), "pattern heads must be 1, the query heads"),
    ],
)
def test_patterns_that_do_not_fit_are_rejected(pattern_kwargs, message):
    q, k, v, _ = _inputs(batch=2)
    kwargs = dict(seq_q=64, seq_k=64, heads=2, batch=1, block_q=16, block_k=16)
    kwargs.update(pattern_kwargs)
    pattern = sa.dense_pattern(**kwargs)
    with pytest.raises(ValueError, match=message):
        sa.block_sparse_attention(q, k, v, pattern)
    with pytest.raises(TypeError, match="pattern must be a BlockSparsePattern"):
        sa.block_sparse_attention(q, k, v, pattern.to_mask())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(scale=0.0), ValueError, "scale must be a positive"),
        (dict(scale=float("nan")), ValueError, "scale must be a positive"),
        (dict(scale="0.1"), TypeError, "scale must be a float"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_options_are_rejected(kwargs, error, message):
    q, k, v, pattern = _inputs()
    with pytest.raises(error, match=message):
        sa.block_sparse_attention(q, k, v, pattern, **kwargs)


def test_bad_method_arguments_are_rejected():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        sa.sparse_attention(q, k, v, method="nope")
    with pytest.raises(TypeError, match="has no option"):
        sa.sparse_attention(q, k, v, method="random", threshold=0.9)
    with pytest.raises(ValueError, match="density must be in"):
        sa.sparse_attention(q, k, v, method="random", density=2.0)
    with pytest.raises(ValueError, match="block_q must be >= 1"):
        sa.estimate(q, k, "dense", block_q=0)
    with pytest.raises(TypeError, match="block_k must be an int"):
        sa.estimate(q, k, "dense", block_k=16.0)


def test_transposed_and_strided_views_are_accepted():
    q, k, v, pattern = _inputs()
    contiguous = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not views[0].is_contiguous()
    for backend in ("reference", "flex", "triton"):
        out = sa.block_sparse_attention(*views, pattern, backend=backend)
        assert relative_error(out, contiguous) < 1e-4, backend
    wide = torch.randn(1, 4, 64, 128)[..., ::2]  # last-dim stride 2
    out = sa.block_sparse_attention(wide, k, v, pattern, backend="triton")
    assert relative_error(out, sa.block_sparse_attention(wide.contiguous(), k, v, pattern, backend="reference")) < 1e-4


_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    import sparse_attn as sa
    seq = int(sys.argv[1])
    q = torch.randn(1, 1, seq, 64); k = torch.randn(1, 1, seq, 64); v = torch.randn(1, 1, seq, 64)
    pattern = sa.random_pattern(seq_q=seq, density=0.05, block_q=128, block_k=128, seed=0)
    sa.block_sparse_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256],
        sa.dense_pattern(seq_q=256, block_q=128, block_k=128), backend="reference")  # warm up allocators
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out).all()
    print((after - before) * 1024)
    """
)


def test_reference_backend_memory_is_not_quadratic():
    """At S = 16K a score matrix would take S^2 * 4 = 1 GiB; the chunked reference stays far below."""
    seq = 16384
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(seq)], capture_output=True, text=True, timeout=300, check=True
    )
    peak_growth = int(result.stdout.strip().splitlines()[-1])
    assert peak_growth < seq * seq * 4 / 4, f"peak RSS grew by {peak_growth / 2**20:.0f} MiB"
