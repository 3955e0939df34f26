"""Head dims the kernels do not take, and a value head dim unlike the query/key one (multi-head
latent attention): both run zero-padded, exactly, forward and backward."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TOLERANCE, naive_attention, random_qkv, relative_error

import sparse_attn as sa
from sparse_attn.api import padded_head_dim


def _qkv(qk_dim, v_dim, *, q_heads=6, kv_heads=2, seq_q=37, seq_k=70, dtype=torch.float32, device="cpu", seed=0):
    q, k, _ = random_qkv(2, q_heads, kv_heads, seq_q, seq_k, qk_dim, dtype=dtype, device=device, seed=seed)
    v = torch.randn(2, kv_heads, seq_k, v_dim, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    return q, k, v


@pytest.mark.parametrize(
    ("qk_dim", "v_dim", "backend", "want"),
    [
        (96, 96, "auto", None),  # on the CPU the reference backend takes any head dim
        (96, 96, "triton", 128),  # a kernel backend named: the next kernel head dim
        (24, 16, "auto", 24),  # v unlike q/k: both to the larger
        (24, 16, "triton", 32),
        (16, 40, "reference", 40),
        (128, 128, "triton", None),
        (300, 300, "triton", None),  # past the kernels' largest: as it is (the reference backend)
        (300, 256, "triton", 300),
    ],
)
def test_padded_head_dim_rule(qk_dim, v_dim, backend, want):
    q, v = torch.zeros(1, 1, 1, qk_dim), torch.zeros(1, 1, 1, v_dim)
    assert padded_head_dim(q, v, backend) == want


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("qk_dim", "v_dim"), [(24, 16), (16, 40), (48, 32)])
def test_value_head_dim_unlike_the_query_one(qk_dim, v_dim, causal):
    q, k, v = _qkv(qk_dim, v_dim)
    pattern = sa.random_pattern(batch=2, heads=2, seq_q=37, seq_k=70, density=0.5, block_q=16, block_k=16,
                                causal=causal, seed=3)  # fmt: skip
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with pytest.warns(UserWarning, match=f"q/k {qk_dim}, v {v_dim} run zero-padded to {max(qk_dim, v_dim)}"):
        out, lse = sa.block_sparse_attention(*leaves, pattern, causal=causal, return_lse=True)
    assert out.shape == (2, 6, 37, v_dim) and out.is_contiguous()
    wanted = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = naive_attention(*wanted, pattern, causal)
    assert relative_error(out.detach(), ref.detach()) <= TOLERANCE[torch.float32]
    assert torch.allclose(lse.detach().double(), ref_lse.detach(), atol=1e-5)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    for got, want in zip(leaves, wanted, strict=True):
        assert got.grad.shape == got.shape
        assert relative_error(got.grad, want.grad) <= TOLERANCE[torch.float32]


def test_sparse_attention_takes_a_value_head_dim_unlike_the_query_one():
    q, k, v = _qkv(32, 16, seq_q=64, seq_k=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sa.sparse_attention(q, k, v, method="streaming", sink_tokens=16, local_tokens=16, block_q=16, block_k=16)
        got, info = sa.sparse_attention(
            q, k, v, method="streaming", sink_tokens=16, local_tokens=16, block_q=16, block_k=16, return_info=True
        )
    ref, _ = naive_attention(q, k, v, info.pattern, True)
    assert out.shape == got.shape == (2, 6, 64, 16)
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]
    assert torch.equal(out, got)


def test_the_triton_kernel_runs_head_dim_96_zero_padded():
    """Under the interpreter: the kernel itself (no fallback to the reference backend), exact."""
    q, k, v = _qkv(96, 96, q_heads=4, kv_heads=2, seq_q=40, seq_k=40)
    pattern = sa.random_pattern(batch=2, heads=2, seq_q=40, density=0.6, block_q=16, block_k=16, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sa.block_sparse_attention(q, k, v, pattern, backend="triton")
    messages = [str(w.message) for w in caught]
    assert any("zero-padded to 128" in m for m in messages), messages
    assert not any("backend" in m for m in messages), messages  # no fallback
    ref, _ = naive_attention(q, k, v, pattern, True)
    assert relative_error(out, ref) <= TOLERANCE[torch.float32]


def test_v_must_still_match_k_but_for_its_last_dimension():
    q, k, v = _qkv(16, 24)
    with pytest.raises(ValueError, match="but for its last dimension"):
        sa.block_sparse_attention(q, k, v[:, :, :-1], sa.dense_pattern(seq_q=37, seq_k=70, block_q=16, block_k=16))


@pytest.mark.gpu
@pytest.mark.parametrize(("qk_dim", "v_dim"), [(96, 96), (192, 128), (80, 80)])
def test_gpu_head_dims_the_kernels_do_not_take_run_padded_on_them(qk_dim, v_dim):
    q, k, v = _qkv(qk_dim, v_dim, q_heads=8, kv_heads=2, seq_q=1000, seq_k=1100, dtype=torch.bfloat16, device="cuda")
    pattern = sa.random_pattern(batch=2, heads=2, seq_q=1000, seq_k=1100, density=0.4, device="cuda", seed=5)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with pytest.warns(UserWarning, match="zero-padded"):
        out = sa.block_sparse_attention(*leaves, pattern)
    wanted = [x.float().requires_grad_() for x in (q, k, v)]
    ref = sa.block_sparse_attention(*wanted, pattern, backend="reference")
    assert relative_error(out.detach().float(), ref.detach()) <= TOLERANCE[torch.bfloat16]
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.float())
    for got, want in zip(leaves, wanted, strict=True):
        assert relative_error(got.grad.float(), want.grad) <= TOLERANCE[torch.bfloat16]
