"""NSA decode steps: the one-query path against the token-level float64 reference, and the
compressed-token cache against recomputing from scratch (appends, crops, restarts, refusals)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_qkv
from test_nsa import _module, reference_nsa

from sparse_attn.nn.nsa import CompressedTokenCache, NativeSparseAttention

# (batch, q_heads, kv_heads, seq_k, head_dim), module options; one query at the last position.
# The small blocks (l = 8, d = 4, l' = 16, n = 4, w = 20) of test_nsa: lengths before the first
# whole compression block, at block edges, and with more blocks than the top-n.
DECODE_CASES = [
    ((1, 4, 2, 5, 8), {}),  # no compressed token yet: forced blocks only
    ((1, 4, 2, 8, 8), {}),  # exactly one
    ((2, 12, 4, 63, 16), {}),  # GQA 3, 12 heads
    ((1, 3, 1, 64, 8), {}),  # a selection block just completed
    ((1, 2, 2, 97, 8), {}),  # group size 1
    ((2, 8, 1, 130, 8), dict(window=0)),  # GQA 8, no window branch
    ((1, 4, 1, 83, 8), dict(compressor="mean", compress_block=8, compress_stride=8, window=0)),
]


@pytest.mark.parametrize("shape, options", DECODE_CASES, ids=str)
def test_decode_step_matches_token_level_reference_with_gradients(shape, options):
    batch, q_heads, kv_heads, seq_k, dim = shape
    module = _module(q_heads, kv_heads, dim, seed=seq_k, **options)
    q, k, v = (x.double().requires_grad_() for x in random_qkv(batch, q_heads, kv_heads, 1, seq_k, dim, seed=seq_k))
    out = module(q, k, v)
    expected_out = reference_nsa(module, q, k, v)
    torch.testing.assert_close(out, expected_out, rtol=1e-9, atol=1e-12)
    grad = torch.randn_like(out)
    parameters = list(module.parameters())
    got = torch.autograd.grad(out, (q, k, v, *parameters), grad, allow_unused=True)
    expected = torch.autograd.grad(expected_out, (q, k, v, *parameters), grad, allow_unused=True)
    names = ["q", "k", "v", *(name for name, _ in module.named_parameters())]
    for name, got_grad, want in zip(names, got, expected, strict=True):
        if want is None or got_grad is None:  # no compressed token: the compressor is not used
            assert got_grad is None or not got_grad.abs().any(), name
            assert want is None or not want.abs().any(), name
            continue
        torch.testing.assert_close(got_grad, want, rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_the_last_row_of_a_full_forward(dtype):
    """The decode path and the prefill path (patterns, block kernels' reference) give the same token."""
    module = _module(6, 2, 16, seed=5).to(dtype)
    q, k, v = random_qkv(2, 6, 2, 90, 90, 16, dtype=dtype, seed=6)
    with torch.no_grad():
        full = module(q, k, v)[:, :, -1:]
        step = module(q[:, :, -1:], k, v)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(step.float(), full.float(), rtol=tolerance, atol=tolerance)


def _steps(module, q, k, v, start, cache):
    """Prefill ``start`` tokens, then one decode step per remaining token; the outputs per call."""
    outs = [module(q[:, :, :start], k[:, :, :start], v[:, :, :start], cache=cache)]
    for end in range(start + 1, k.shape[2] + 1):
        outs.append(module(q[:, :, end - 1 : end], k[:, :, :end], v[:, :, :end], cache=cache))
    return outs


@pytest.mark.parametrize("compressor", ["mlp", "mean", "mean_mlp"])
def test_cache_gives_the_same_outputs_as_recomputing(compressor):
    module = _module(4, 2, 8, seed=1, compressor=compressor).float()
    q, k, v = random_qkv(2, 4, 2, 70, 70, 8, seed=2)
    cache = CompressedTokenCache()
    with torch.no_grad():
        cached = _steps(module, q, k, v, 5, cache)
        fresh = _steps(module, q, k, v, 5, None)
    for got, want in zip(cached, fresh, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert cache.count == module.compressed_count(70) and cache.seq_k == 70
    k_cmp, v_cmp = module._compress(k, v)
    held_k, held_v = cache.update(module, k, v, 0)
    torch.testing.assert_close(held_k, k_cmp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(held_v, v_cmp, rtol=1e-6, atol=1e-6)


def test_cache_starts_over_when_the_keys_did_not_just_grow():
    module = _module(4, 2, 8, seed=3).float()
    other = _module(4, 2, 8, seed=4).float()
    q, k, v = random_qkv(1, 4, 2, 60, 60, 8, seed=5)
    k2, v2 = (x + 1.0 for x in (k, v))  # another sequence
    with torch.no_grad():
        cache = CompressedTokenCache()
        module(q[:, :, :40], k[:, :, :40], v[:, :, :40], cache=cache)
        # 41 keys of another sequence after 40 seen would look like a decode step, which the cache
        # cannot tell apart (documented): only lengths that do not fit are checked here.
        for seq_k in (30, 45, 60):  # shorter, longer by more than the queries, longer again
            got = module(q[:, :, seq_k - 1 : seq_k], k2[:, :, :seq_k], v2[:, :, :seq_k], cache=cache)
            want = module(q[:, :, seq_k - 1 : seq_k], k2[:, :, :seq_k], v2[:, :, :seq_k])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # another module's compressor: recompute
        got = other(q[:, :, 59:], k2, v2, cache=cache)
        torch.testing.assert_close(got, other(q[:, :, 59:], k2, v2), rtol=1e-6, atol=1e-6)
        # another batch size
        q3, k3, v3 = random_qkv(2, 4, 2, 61, 61, 8, seed=6)
        got = other(q3[:, :, 60:], k3, v3, cache=cache)
        torch.testing.assert_close(got, other(q3[:, :, 60:], k3, v3), rtol=1e-6, atol=1e-6)
        cache.reset()
        assert cache.count == 0 and cache.seq_k == 0


def test_cache_is_not_used_with_gradients_and_says_so():
    module = _module(4, 2, 8, seed=7).float()
    q, k, v = random_qkv(1, 4, 2, 1, 30, 8, seed=8)
    cache = CompressedTokenCache()
    with pytest.warns(UserWarning, match="inference"):
        out = module(q, k.requires_grad_(), v, cache=cache)
    assert cache.count == 0
    out.sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0


def test_bad_cache_is_refused():
    module = NativeSparseAttention(8, 4, 2)
    q, k, v = random_qkv(1, 4, 2, 1, 30, 8, seed=9)
    with pytest.raises(TypeError, match="cache must be a CompressedTokenCache"):
        module(q, k, v, cache={})
    with pytest.raises(ValueError, match="new_tokens"):
        CompressedTokenCache().update(module, k, v, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(64, 4, 128), (9, 3, 64)])
def test_gpu_decode_step_matches_the_float64_decode_on_cpu(heads):
    """NSA's shape (and SmolLM2's) at 4,100 keys, bf16 on the GPU, paper defaults with random
    parameters, cache path: the step against the same step in float64 on the CPU (whose rule the
    CPU tests check against the token-level reference); outputs within 2e-2."""
    q_heads, kv_heads, dim = heads
    torch.manual_seed(0)
    module = NativeSparseAttention(dim, q_heads, kv_heads)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.02)
    q, k, v = random_qkv(2, q_heads, kv_heads, 1, 4100, dim, seed=1)
    gpu = module.to("cuda", torch.bfloat16)
    cache = CompressedTokenCache()
    with torch.no_grad():
        k16, v16 = (x.to("cuda", torch.bfloat16) for x in (k, v))
        gpu(q.to("cuda", torch.bfloat16), k16[:, :, :4099], v16[:, :, :4099], cache=cache)
        out = gpu(q.to("cuda", torch.bfloat16), k16, v16, cache=cache)
        assert cache.count == gpu.compressed_count(4100)
        cpu = gpu.to("cpu", torch.float64)
        want = cpu(*(x.to("cpu", torch.float64) for x in (q.to(torch.bfloat16), k16, v16)))
    assert torch.isfinite(out).all()
    assert float((out.double().cpu() - want).norm() / want.norm()) <= 2e-2


def test_decode_step_takes_strided_queries():
    """Queries as transformers passes them ((B, S, H, D) storage seen as (B, H, S, D)) and with a
    last-dimension stride: the same result as contiguous ones."""
    module = _module(6, 2, 8, seed=11).float()
    q, k, v = random_qkv(2, 6, 2, 1, 50, 8, seed=12)
    strided = torch.randn(2, 1, 6, 16)[..., ::2].transpose(1, 2)  # (B, H, 1, D), stride 2 in D
    with torch.no_grad():
        got = module(strided, k, v)
        want = module(strided.contiguous(), k, v)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
