"""GPU checks of the second-wave estimators (sale, anchor, moa, hip, auto) and pbs_attention (run by the lead on the H200)."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, random_qkv, relative_error
from planted import PlantedSpec, planted_qkv

import sparse_attn as sa
from sparse_attn.methods.pbs import pbs_attention

pytestmark = pytest.mark.gpu

OPTIONS = {
    "sale": dict(sink_tokens=16, local_tokens=16),
    "anchor": dict(init_tokens=16, local_tokens=16, step=4, theta=8.0),
    "moa": dict(alpha=64.0, beta=0.1, sink_tokens=16),
    "hip": dict(top_k_tokens=64, sink_tokens=16, window_tokens=16),
    "auto": dict(
        recall=0.9, candidates=("streaming", ("block_topk", {"top_k": 4}), ("xattention", {"threshold": 0.9}))
    ),
}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_gpu_patterns_match_cpu_patterns_closely(method):
    q, k, v = planted_qkv(PlantedSpec(needle_shared_by_group=True))
    cpu = sa.estimate(q, k, method, block_q=16, block_k=16, **OPTIONS[method]).to_mask()
    gpu = sa.estimate(q.cuda(), k.cuda(), method, block_q=16, block_k=16, **OPTIONS[method]).to_mask().cpu()
    assert float((cpu != gpu).float().mean()) < 0.02
    half = [x.cuda().bfloat16() for x in (q, k, v)]
    out = sa.sparse_attention(*half, method=method, block_q=16, block_k=16, **OPTIONS[method])
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("method", ["sale", "anchor", "moa", "hip"])
def test_gpu_estimators_at_32k_give_valid_sparse_patterns(method):
    q, k, v = random_qkv(1, 32, 8, 32768, 32768, 128, dtype=torch.bfloat16, device="cuda", seed=0)
    k[:, :, :64] *= 4.0
    pattern = sa.estimate(q, k, method)
    pattern.validate()
    assert pattern.density() <= 1.0
    out = sa.block_sparse_attention(q, k, v, pattern)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pbs_attention_matches_the_reference_backend_with_gradients(dtype):
    q, k, v = random_qkv(2, 12, 4, 2048, 2048, 128, dtype=dtype, device="cuda", seed=1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    reference_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = pbs_attention(*leaves, backend="auto")
    expected = pbs_attention(*reference_leaves, backend="reference")
    assert relative_error(out, expected) < TOLERANCE[dtype]
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for ours, theirs in zip(leaves, reference_leaves, strict=True):
        assert relative_error(ours.grad, theirs.grad) < 2 * TOLERANCE[dtype]
