"""The flash4 backend (FlashAttention-4 through FlexAttention's FLASH backend).

CPU: where it cannot run it says why and falls back; ``auto`` takes it only for measured case
classes. GPU (``-m gpu``, skipped where FA4 is not installed): results and gradients against
the reference backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TOLERANCE, random_qkv, relative_error, shape_pattern

import sparse_attn as sa
from sparse_attn.backends import BACKENDS, flash4, resolve_backend
from sparse_attn.plan import plan_for


def test_flash4_is_a_backend_name():
    assert "flash4" in BACKENDS


def test_cpu_case_names_why_and_falls_back_to_a_correct_backend():
    q, k, v = random_qkv(1, 4, 2, 70, 70, 64, seed=1)
    pattern = sa.random_pattern(heads=2, seq_q=70, density=0.5, block_q=64, block_k=64, seed=1)
    assert flash4.unsupported_reason(q, k, v, pattern, return_lse=False) == "the flash4 backend needs a CUDA device"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = resolve_backend("flash4", q, k, v, pattern, causal=True, return_lse=False)
    assert name != "flash4"
    assert any("the flash4 backend needs a CUDA device" in str(w.message) for w in caught)
    out = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = sa.block_sparse_attention(q, k, v, pattern, backend="flash4")
    assert relative_error(got, out) <= 1e-4


def test_installed_reports_a_missing_module(monkeypatch):
    monkeypatch.setattr(flash4.importlib.util, "find_spec", lambda name: None)
    flash4.installed.cache_clear()
    try:
        assert "pip install nvidia-cutlass-dsl" in flash4.installed()
    finally:
        flash4.installed.cache_clear()


def test_auto_takes_flash4_only_in_measured_case_classes_from_a_shapes_second_call(monkeypatch):
    q, k = torch.zeros(1, 4, 4096, 128), torch.zeros(1, 2, 4096, 128)
    pattern = sa.random_pattern(heads=2, seq_q=4096, density=0.1, seed=3)
    plan = plan_for(pattern, causal=True)
    monkeypatch.setattr(flash4, "_SEEN_SHAPES", {})
    monkeypatch.setattr(flash4, "FASTER_CASES", (("forward", 128, (2048, 8192), (0.0, 0.3)),))
    assert "first call at this shape" in flash4.slower_than_ours_reason(q, k, plan, needs_grad=False)
    assert flash4.slower_than_ours_reason(q, k, plan, needs_grad=False) is None
    assert "training" in flash4.slower_than_ours_reason(q, k, plan, needs_grad=True)
    assert "not measured" in flash4.slower_than_ours_reason(q[..., :64], k[..., :64], plan, needs_grad=False)
    monkeypatch.setattr(flash4, "FASTER_CASES", (("forward", 128, (8192, 16384), (0.0, 0.3)),))
    assert "not measured" in flash4.slower_than_ours_reason(q, k, plan, needs_grad=False)


def test_seen_shapes_are_bounded(monkeypatch):
    monkeypatch.setattr(flash4, "_SEEN_SHAPES", {})
    monkeypatch.setattr(flash4, "_SEEN_SHAPES_KEPT", 3)
    monkeypatch.setattr(flash4, "FASTER_CASES", (("forward", 16, (0, 1 << 20), (0.0, 1.01)),))
    for seq in range(64, 64 * 6, 64):
        q = torch.zeros(1, 1, seq, 16)
        plan = plan_for(sa.dense_pattern(seq_q=seq, block_q=64, block_k=64), causal=True)
        flash4.slower_than_ours_reason(q, q, plan, needs_grad=False)
    assert len(flash4._SEEN_SHAPES) == 3


def test_lse_correction_by_torch_version(monkeypatch):
    for version, expected in (("2.11.0+cu130", 1 / 0.6931471805599453), ("2.13.0+cpu", 1.0), ("2.12.1", None)):
        monkeypatch.setattr(flash4.torch, "__version__", version)
        got = flash4._lse_correction()
        assert got == pytest.approx(expected) if expected is not None else got is None


def _requires_flash4():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if flash4.installed() is not None:
        pytest.skip(flash4.installed())


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k)
# Each case compiles FA4 once (seconds each): per query head / per KV head / shared lists are
# spread over the shapes rather than crossed with them.
GPU_CASES = [
    ((1, 32, 8, 1000, 1500, 128, 128, 128), "kv"),
    ((2, 6, 3, 777, 777, 64, 128, 128), "query"),
    ((1, 8, 1, 513, 513, 64, 128, 64), "shared"),
    ((2, 12, 4, 1024, 2048, 128, 128, 128), "query"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_flash4_matches_reference(case, causal):
    _requires_flash4()
    shape, heads_kind = case
    heads = {"query": shape[1], "kv": shape[2], "shared": 1}[heads_kind]
    q, k, v = random_qkv(*shape[:6], dtype=torch.bfloat16, device="cuda", seed=4)
    for density in (0.0, 0.3, 1.0):
        pattern = shape_pattern(shape, heads=heads, density=density, causal=causal, seed=4, device="cuda")
        assert flash4.unsupported_reason(q, k, v, pattern, return_lse=True) is None
        out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="flash4", return_lse=True)
        ref, ref_lse = sa.block_sparse_attention(
            q.float(), k.float(), v.float(), pattern, causal=causal, backend="reference", return_lse=True
        )
        assert torch.isfinite(out).all()
        assert relative_error(out.float(), ref) <= TOLERANCE[torch.bfloat16], (density, heads_kind)
        assert torch.allclose(lse, ref_lse, atol=2e-2)


def _gradients(backend, q, k, v, pattern, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    sa.block_sparse_attention(*leaves, pattern, backend=backend).backward(dout)
    return [x.grad for x in leaves]


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_flash4_gradients_match_reference(dim):
    """Head_dim 64 included: flash-attention issue 2623 reported wrong sm_90 block-sparse gradients there."""
    _requires_flash4()
    shape = (2, 8, 2, 1000, 1000, dim, 128, 128)
    q, k, v = random_qkv(*shape[:6], dtype=torch.bfloat16, device="cuda", seed=5)
    pattern = shape_pattern(shape, heads=2, density=0.3, causal=True, seed=5, device="cuda")
    dout = torch.randn_like(q)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _gradients("flash4", q, k, v, pattern, dout)
    fallbacks = [str(w.message) for w in caught if "backend" in str(w.message)]
    assert not fallbacks, fallbacks  # FA4 itself differentiates
    want = _gradients("reference", q.float(), k.float(), v.float(), pattern, dout.float())
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        assert relative_error(g.float(), w) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_flash4_refuses_head_dim_256_and_falls_back_correctly():
    _requires_flash4()
    q, k, v = random_qkv(1, 4, 2, 512, 512, 256, dtype=torch.bfloat16, device="cuda", seed=6)
    pattern = sa.random_pattern(heads=2, seq_q=512, density=0.5, device="cuda", seed=6)
    with pytest.warns(UserWarning, match="up to 128, not 256"):
        out = sa.block_sparse_attention(q, k, v, pattern, backend="flash4")
    ref = sa.block_sparse_attention(q.float(), k.float(), v.float(), pattern, backend="reference")
    assert relative_error(out.float(), ref) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_auto_moves_a_repeated_training_shape_to_flash4():
    _requires_flash4()
    q, k, v = random_qkv(1, 8, 2, 4096, 4096, 128, dtype=torch.bfloat16, device="cuda", seed=8)
    pattern = sa.random_pattern(heads=2, seq_q=4096, density=0.2, device="cuda", seed=8)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    first = resolve_backend("auto", *leaves, pattern, causal=True, return_lse=False)
    second = resolve_backend("auto", *leaves, pattern, causal=True, return_lse=False)
    assert (first, second) == ("gluon", "flash4")
