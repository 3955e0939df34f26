"""Gradients of block-sparse attention on every backend against a float64 oracle.

The oracle is dense masked softmax attention in float64 (``helpers.naive_attention``), so the
same loss ``sum(out * dout) + sum(lse * dlse)`` is differentiated two independent ways. Kernel
gradients come from a NaN-poisoned allocator, so an element a kernel forgets to write shows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import TOLERANCE, naive_attention, random_qkv, relative_error, shape_pattern, text_rows_pattern

import sparse_attn as sa
from sparse_attn.plan import plan_for

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k): odd lengths, GQA 1-8,
# non-power-of-2 head counts, head_dim 64 (explicitly: a peer's block-sparse backward is wrong
# there), Sq < Sk, batch > 1.
SHAPES = [
    (1, 1, 1, 64, 64, 64, 16, 16),
    (2, 4, 2, 50, 77, 32, 16, 32),
    (1, 6, 3, 40, 40, 64, 32, 16),
    (2, 3, 3, 33, 100, 64, 16, 16),
    (1, 8, 1, 45, 45, 16, 16, 16),
    (1, 12, 4, 31, 64, 64, 16, 16),
]


def _oracle_grads(q, k, v, pattern, causal, dout, dlse):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = naive_attention(*leaves, pattern, causal)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (lse * dlse.double()).sum()
    loss.backward()
    return [x.grad for x in leaves]


def _grads(backend, q, k, v, pattern, causal, dout, dlse):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    if dlse is None:
        out = sa.block_sparse_attention(*leaves, pattern, causal=causal, backend=backend)
        out.backward(dout)
    else:
        out, lse = sa.block_sparse_attention(*leaves, pattern, causal=causal, backend=backend, return_lse=True)
        torch.autograd.backward((out, lse), (dout, dlse))
    return [x.grad for x in leaves]


def _pattern(shape, causal, heads_kind, seed, density=0.4):
    heads = {"query": shape[1], "kv": shape[2], "shared": 1}[heads_kind]
    return shape_pattern(shape, heads=heads, density=density, causal=causal, seed=seed)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_match_float64_oracle(shape, causal, backend, poison_outputs):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, *_ = shape
    for seed, heads_kind in enumerate(("query", "kv", "shared")):
        q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seed)
        pattern = _pattern(shape, causal, heads_kind, seed)
        dout = torch.randn_like(q)
        dlse = torch.randn(batch, q_heads, seq_q) if seed == 1 else None
        expected = _oracle_grads(q, k, v, pattern, causal, dout, dlse)
        for name, got, want in zip("qkv", _grads(backend, q, k, v, pattern, causal, dout, dlse), expected, strict=True):
            assert torch.isfinite(got).all(), f"d{name} has non-finite values"
            assert relative_error(got, want) <= TOLERANCE[torch.float32], f"d{name} ({heads_kind} pattern)"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_backward_runs_under_the_forwards_kernel_configs(device, monkeypatch):
    """PyTorch runs CUDA backwards on its own thread, outside the forward's ``with kernel_configs``:
    the backward must see the overrides the forward saw, wherever it is called."""
    from sparse_attn.backends import configs

    seen = []
    original = configs.backward_skips_masked_tiles
    monkeypatch.setattr(configs, "backward_skips_masked_tiles", lambda: seen.append(configs.current()) or original())
    shape = SHAPES[1]
    q, k, v = (x.requires_grad_() for x in random_qkv(*shape[:6], device=device, seed=4))
    pattern = _pattern(shape, True, "kv", 4).to(device)
    with sa.backends.kernel_configs(triton_backward_skip_masked=True, kv_streams_per_wave=2):
        out = sa.block_sparse_attention(q, k, v, pattern, backend="triton")
    out.sum().backward()
    assert [(c.triton_backward_skip_masked, c.kv_streams_per_wave) for c in seen] == [(True, 2)]
    assert configs.current().triton_backward_skip_masked is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_gradients(dtype, poison_outputs):
    shape = (2, 4, 1, 70, 96, 64, 32, 32)
    q, k, v = random_qkv(*shape[:6], dtype=dtype, seed=3)
    pattern = _pattern(shape, True, "kv", 3)
    dout = torch.randn_like(q)
    expected = _oracle_grads(q, k, v, pattern, True, dout, None)
    for got, want in zip(_grads("triton", q, k, v, pattern, True, dout, None), expected, strict=True):
        assert got.dtype == dtype
        assert relative_error(got, want) <= TOLERANCE[dtype]


def test_reference_gradcheck_in_float64():
    q, k, v = (x.double().requires_grad_() for x in random_qkv(1, 2, 1, 20, 29, 8, seed=5))
    pattern = sa.random_pattern(seq_q=20, seq_k=29, density=0.5, block_q=8, block_k=8, seed=5)

    def attention(q, k, v):  # the LSE is float32 by contract: too coarse for finite differences
        return sa.block_sparse_attention(q, k, v, pattern, backend="reference")

    assert torch.autograd.gradcheck(attention, (q, k, v))


def test_unused_output_gets_zero_gradients_not_nan(poison_outputs):
    """Only the LSE feeds the loss: dV is exactly zero, dQ and dK finite."""
    shape = (1, 2, 1, 40, 40, 32, 16, 16)
    q, k, v = random_qkv(*shape[:6], seed=7)
    pattern = _pattern(shape, True, "kv", 7)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    _, lse = sa.block_sparse_attention(*leaves, pattern, backend="triton", return_lse=True)
    lse.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_keys_no_query_attends_get_zero_gradient(poison_outputs):
    """KV blocks no query block lists get exactly zero dK and dV (the kernel still writes them)."""
    q, k, v = random_qkv(1, 2, 2, 64, 64, 32, seed=8)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, 0] = True
    pattern = sa.BlockSparsePattern.from_mask(mask, block_q=16, block_k=16, seq_q=64, seq_k=64, causal=False)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    sa.block_sparse_attention(*leaves, pattern, causal=False, backend="triton").sum().backward()
    for grad in (k.grad, v.grad):
        assert torch.isfinite(grad[:, :, :16]).all() and grad[:, :, :16].abs().sum() > 0
        assert torch.equal(grad[:, :, 16:], torch.zeros_like(grad[:, :, 16:]))


def test_sparse_attention_is_differentiable_and_the_estimate_is_not():
    q, k, v = random_qkv(1, 4, 2, 96, 96, 32, seed=9)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, info = sa.sparse_attention(*leaves, method="xattention", block_q=32, block_k=32, return_info=True)
    out.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)
    expected = _oracle_grads(q, k, v, info.pattern, True, torch.ones_like(out), None)
    for got, want in zip((x.grad for x in leaves), expected, strict=True):
        assert relative_error(got, want) <= TOLERANCE[torch.float32]


_BACKWARD_MEMORY_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    import sparse_attn as sa
    seq = int(sys.argv[1])
    q, k, v = (torch.randn(1, 1, seq, 64, requires_grad=True) for _ in range(3))
    pattern = sa.random_pattern(seq_q=seq, density=0.3, block_q=128, block_k=128, seed=0)
    small = [x[:, :, :256].detach().requires_grad_() for x in (q, k, v)]
    sa.block_sparse_attention(*small, sa.dense_pattern(seq_q=256), backend="reference").sum().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sa.block_sparse_attention(q, k, v, pattern).sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    print((after - before) * 1024)
    """
)


def test_cpu_backward_memory_is_not_quadratic():
    """At S = 16K and density 0.3 the kept scores alone take ~0.4 GiB in float32, and autograd
    would save several such tensors; the default CPU backward recomputes chunk by chunk."""
    seq = 16384
    # glibc raises its mmap threshold after large frees and then serves big temporaries from a
    # heap it does not trim, so peak RSS would measure fragmentation; a fixed threshold makes
    # every large tensor its own mapping, returned on free.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-c", _BACKWARD_MEMORY_PROBE, str(seq)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        env=env,
    )
    peak_growth = int(result.stdout.strip().splitlines()[-1])
    assert peak_growth < seq * seq * 4 / 4, f"peak RSS grew by {peak_growth / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "gluon", "auto", "flex"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [(1000, 1300), (1024, 2048)], ids=["odd", "whole-blocks"])
def test_gpu_gradients_match_reference(backend, dim, dtype, lengths, poison_outputs):
    """Odd lengths (masked loads) and lengths that fill whole blocks (unmasked loads)."""
    shape = (2, 8, 2, *lengths, dim, 128, 128)
    q, k, v = random_qkv(*shape[:6], dtype=dtype, device="cuda", seed=11)
    pattern = _pattern(shape, True, "kv", 11, density=0.3).to("cuda")
    dout = torch.randn_like(q)
    expected = _grads("reference", q.float(), k.float(), v.float(), pattern, True, dout.float(), None)
    for got, want in zip(_grads(backend, q, k, v, pattern, True, dout, None), expected, strict=True):
        assert torch.isfinite(got).all()
        assert relative_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.gpu
def test_gpu_backward_at_length_uses_linear_memory():
    """32K tokens, 32/8 heads: a backward that held O(S^2) scores would need > 60 GB."""
    seq = 32768
    q, k, v = random_qkv(1, 32, 8, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=12)
    pattern = sa.random_pattern(heads=8, seq_q=seq, density=0.1, device="cuda")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sa.block_sparse_attention(*leaves, pattern, backend="auto").backward(torch.ones_like(q))
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 2 * 1024**3, f"backward took {extra / 2**30:.1f} GiB beyond its inputs"
    assert all(torch.isfinite(x.grad).all() for x in leaves)


def test_backward_tiles_follow_the_pattern_blocks_and_the_override():
    from sparse_attn.backends import configs, kernel_configs, triton_backward

    tiles = configs.backward_tiles("dkdv", 128, 128, 128, small=False)
    assert tiles == configs.TRITON_BACKWARD_TILES["dkdv"][128]
    assert configs.backward_tiles("dq", 64, 16, 16, small=False) == ((16, 16, 4, 1),)  # none divides: the default
    with kernel_configs(triton_backward_tiles=[(64, 64, 4, 2), (32, 128, 8, 2)]):
        assert configs.backward_tiles("dq", 128, 64, 64, small=False) == ((64, 64, 4, 2),)
    with pytest.raises(ValueError, match="triton_backward_tiles"):
        with kernel_configs(triton_backward_tiles=[(64, 64, 4)]):
            pass
    autotuner = triton_backward._autotuned("dq", tiles)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in autotuner.configs] == list(
        tiles
    )


def test_estimate_builds_no_autograd_graph():
    """Estimating from q/k that require grad saves nothing for a backward pass."""
    q, k, _ = random_qkv(1, 4, 2, 64, 64, 32, seed=13)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        sa.estimate(q.requires_grad_(), k.requires_grad_(), "xattention", block_q=16, block_k=16)
        sa.estimate(q, k, "flexprefill", block_q=16, block_k=16)
    assert saved == []


@pytest.mark.parametrize("shape, causal", [(SHAPES[1], False), (SHAPES[5], True)], ids=["not-causal", "causal"])
def test_triton_backward_launch_waves_change_no_gradient(shape, causal, poison_outputs):
    # Waves only reorder the backward's programs: every wave size gives the one-wave gradients
    # bit for bit, and those match the float64 oracle.
    batch, q_heads, kv_heads, seq_q, seq_k, dim, _, _ = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, torch.float32, "cpu")
    pattern = _pattern(shape, causal, "query", seed=9)
    dout = torch.randn_like(q)
    grads = {}
    for streams in (0, 1, 2):
        with sa.backends.kernel_configs(kv_streams_per_wave=streams):
            grads[streams] = _grads("triton", q, k, v, pattern, causal, dout, None)
    for got, want in zip(grads[0], _oracle_grads(q, k, v, pattern, causal, dout, None), strict=True):
        assert relative_error(got.double(), want) <= 1e-4
    for streams in (1, 2):
        for got, want in zip(grads[streams], grads[0], strict=True):
            assert torch.equal(got, want), streams


def test_triton_backward_heavy_blocks_first_change_no_gradient(poison_outputs):
    # Text-like rows and columns: the last two query blocks keep every KV block and every query
    # block keeps the last two KV blocks. The backward issues them for every stream before its
    # waves (dQ: heavy query blocks; dK/dV: heavy KV blocks), or within them: the same gradients
    # bit for bit, in one wave and in waves, matching the float64 oracle.
    seq, block = 20 * 16 - 5, 16
    n = -(-seq // block)
    # A diagonal, 3 blocks a row with the text keys: a mean of 4.7 against the text rows' 20.
    pattern = text_rows_pattern(4, seq, block, band=0, text_keys=True)
    plan = plan_for(pattern, causal=False)
    assert (plan.heavy_blocks, plan.heavy_kv_blocks) == (2, 2)
    assert set(plan.transposed.work_order[:2].tolist()) == {n - 2, n - 1}
    q, k, v = random_qkv(1, 4, 2, seq, seq, 16, torch.float32, "cpu")
    dout = torch.randn_like(q)
    grads = {}
    # One wave orders the programs alike with or without the lead; 2 streams: 2 waves of 1.
    for streams, lead in ((0, True), (1, True), (1, False)):
        with sa.backends.kernel_configs(kv_streams_per_wave=streams, heavy_rows_first=lead):
            grads[streams, lead] = _grads("triton", q, k, v, pattern, False, dout, None)
    for got, want in zip(grads[0, True], _oracle_grads(q, k, v, pattern, False, dout, None), strict=True):
        assert relative_error(got.double(), want) <= 1e-4
    for key, result in grads.items():
        for got, want in zip(result, grads[0, True], strict=True):
            assert torch.equal(got, want), key


@pytest.mark.parametrize(
    "module_name, shape",
    [
        ("triton", (2, 6, 3, 45, 70, 32, 16, 16)),  # block kernels; GQA 2, Sq < Sk, odd lengths
        ("triton_tokens", (2, 6, 2, 23, 37, 32, 1, 16)),  # token kernels, one-token lists, group 3
        ("triton_tokens", (1, 4, 4, 10, 70, 16, 1, 256)),  # token kernels' gathered path (block_k >= 256)
    ],
    ids=str,
)
def test_fused_backward_arguments_equal_the_plain_backward(module_name, shape, poison_outputs):
    """``backward(delta=, dq_into=)`` (the fused NSA backward's entry, :mod:`sparse_attn.nn.nsa_fused`):
    a precomputed delta gives the plain backward's dK/dV, and dQ is added into ``dq_into``'s values
    and returned in it."""
    import importlib

    from sparse_attn.backends.triton_backward import row_delta

    backend = importlib.import_module(f"sparse_attn.backends.{module_name}")
    pattern = shape_pattern(shape, heads=shape[2], density=0.5, causal=True, seed=11)
    q, k, v = random_qkv(*shape[:6], seed=11)
    scale = shape[5] ** -0.5
    out, lse = backend.forward(q, k, v, pattern, causal=True, scale=scale, return_lse=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12))
    plan = plan_for(pattern, causal=True)
    dq, dk, dv = backend.backward(q, k, v, out, lse, dout, None, plan, scale=scale)
    start = torch.randn(q.shape, generator=torch.Generator().manual_seed(13))
    into = start.clone()
    delta = row_delta(out, dout, None)
    # out and dout are not read with a delta given: NaN copies would show if they were.
    nan_out = torch.full_like(out, float("nan"))
    got_dq, got_dk, got_dv = backend.backward(q, k, v, nan_out, lse, dout, None, plan, scale=scale, delta=delta,
                                              dq_into=into)  # fmt: skip
    assert got_dq is into
    torch.testing.assert_close(got_dq, start + dq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dk, dk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_dv, dv, rtol=1e-5, atol=1e-5)


def test_fused_backward_arguments_are_checked():
    from sparse_attn.backends import triton_backward

    shape = (1, 2, 1, 16, 16, 16, 16, 16)
    pattern = shape_pattern(shape, heads=1, density=1.0, causal=True, seed=1)
    q, k, v = random_qkv(*shape[:6], seed=1)
    plan = plan_for(pattern, causal=True)
    rows = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="delta"):
        triton_backward.backward(q, k, v, q, rows, q, None, plan, scale=0.25, delta=rows.double())
    with pytest.raises(ValueError, match="dq_into"):
        triton_backward.backward(q, k, v, q, rows, q, None, plan, scale=0.25, dq_into=q[..., :8])
