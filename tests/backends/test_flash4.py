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
from sparse_attn.masked_pattern import MaskedPattern
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


class _StandInFlashAttention:
    """``flash_attn.cute.flash_attn_func``'s contract on the CPU, from SDPA: ``(B, S, H, D)``
    inputs (GQA by head index), causal aligned to the last query, ``(out, lse)`` with the natural-
    log LSE ``(B, H, Sq)`` or ``None``. Records the layouts it was handed."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, softmax_scale=None, causal=False, return_lse=False):
        self.calls.append(dict(shapes=(q.shape, k.shape), causal=causal, scale=softmax_scale))
        q_, k_, v_ = (x.transpose(1, 2).double() for x in (q, k, v))
        group = q_.shape[1] // k_.shape[1]
        k_, v_ = (x.repeat_interleave(group, dim=1) for x in (k_, v_))
        scores = q_ @ k_.transpose(-1, -2) * softmax_scale
        if causal:
            seq_q, seq_k = scores.shape[-2:]
            visible = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(seq_k - seq_q)
            scores = scores.masked_fill(~visible, float("-inf"))
        lse = scores.logsumexp(-1)
        out = (scores.softmax(-1) @ v_).to(q.dtype).transpose(1, 2).contiguous()
        return out, (lse.float() if return_lse else None)


@pytest.fixture
def stand_in_fa4(monkeypatch):
    import sys
    import types

    fake = _StandInFlashAttention()
    package, cute = types.ModuleType("flash_attn"), types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = fake
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return fake


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 6, 2, 200, 333, 64, 64, 64), (1, 4, 4, 130, 130, 32, 64, 16)], ids=str)
def test_a_dense_pattern_runs_fa4s_dense_kernel_with_our_conventions(stand_in_fa4, shape, causal):
    """The dense route's layouts, scale, causal alignment (Sq < Sk) and LSE, on the CPU through a
    stand-in with FA4's contract; the real kernel is checked by the GPU tests' density-1 cases."""
    q, k, v = random_qkv(*shape[:6], seed=11)
    pattern = shape_pattern(shape, heads=shape[2], density=1.0, causal=causal, seed=11)
    assert flash4.keeps_every_block(pattern, causal=causal)
    out, lse = flash4.forward(q, k, v, pattern, causal=causal, scale=0.3, return_lse=True)
    ref, ref_lse = sa.block_sparse_attention(
        q, k, v, pattern, causal=causal, scale=0.3, backend="reference", return_lse=True
    )
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert relative_error(out, ref) <= 1e-5
    assert torch.allclose(lse, ref_lse, atol=1e-5)
    (call,) = stand_in_fa4.calls
    batch, q_heads, kv_heads, seq_q, seq_k, dim = shape[:6]
    assert call == dict(shapes=((batch, seq_q, q_heads, dim), (batch, seq_k, kv_heads, dim)), causal=causal, scale=0.3)
    assert isinstance(flash4.forward(q, k, v, pattern, causal=causal, scale=0.3), torch.Tensor)


def test_only_patterns_keeping_every_block_take_the_dense_kernel(stand_in_fa4, monkeypatch):
    shape = (1, 4, 2, 300, 300, 64, 64, 64)
    sparse = shape_pattern(shape, heads=2, density=0.6, causal=True, seed=12)
    assert not flash4.keeps_every_block(sparse, causal=True)
    # A causal dense pattern is not dense without causal (its upper blocks are missing).
    causal_dense = shape_pattern(shape, heads=2, density=1.0, causal=True, seed=12)
    assert flash4.keeps_every_block(causal_dense, causal=True)
    assert not flash4.keeps_every_block(causal_dense, causal=False)
    # A token rule inside the blocks is not dense attention.
    window = MaskedPattern(
        kv_counts=causal_dense.kv_counts, kv_indices=causal_dense.kv_indices, block_q=64, block_k=64,
        seq_q=300, seq_k=300, token_rule=_EveryOtherKey(), rule_partial=torch.ones_like(causal_dense.kv_indices, dtype=torch.bool),
    )  # fmt: skip
    assert not flash4.keeps_every_block(window, causal=True)
    taken = []
    monkeypatch.setattr(flash4.flex, "attend", lambda *args, **kwargs: taken.append("flex") or args[0])
    flash4.forward(*random_qkv(*shape[:6], seed=12), sparse, causal=True, scale=0.125)
    assert taken == ["flex"] and not stand_in_fa4.calls


class _EveryOtherKey:
    def allowed(self, q_pos, k_pos):
        return k_pos % 2 == 0


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
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_gpu_flash4_gradients_match_reference(dim, density):
    """Head_dim 64 included: flash-attention issue 2623 reported wrong sm_90 block-sparse gradients
    there. Density 1 runs FA4's dense kernel and its backward (queries the last 1000 of 1100 keys)."""
    _requires_flash4()
    shape = (2, 8, 2, 1000, 1000 if density < 1 else 1100, dim, 128, 128)
    q, k, v = random_qkv(*shape[:6], dtype=torch.bfloat16, device="cuda", seed=5)
    pattern = shape_pattern(shape, heads=2, density=density, causal=True, seed=5, device="cuda")
    assert flash4.keeps_every_block(pattern, causal=True) == (density == 1.0)
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
