"""Centroid scores operator (``retrieval``'s search): the kernel (interpreter) and the reference against a
cluster-by-cluster loop of the group-summed query's product with each centroid; GPU."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops.centroid_scores import centroid_scores
from sparse_attn.ops.centroid_scores.naive import centroid_scores_reference
from sparse_attn.ops.centroid_scores.triton import centroid_scores_triton


def _loop(q, centroids, sizes):
    batch, q_heads, _ = q.shape
    kv_heads, clusters = centroids.shape[1:3]
    group = q_heads // kv_heads
    out = torch.empty(batch, kv_heads, clusters, dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            query = q[b, h * group : (h + 1) * group].double().cpu().sum(0)
            for c in range(clusters):
                used = int(sizes[b, h, c]) > 0
                out[b, h, c] = float(centroids[b, h, c].double().cpu() @ query) if used else float("-inf")
    return out


def _inputs(batch, q_heads, kv_heads, clusters, dim, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, dim, generator=generator).to(dtype=dtype, device=device)
    centroids = torch.randn(batch, kv_heads, clusters, dim, generator=generator).to(dtype=dtype, device=device)
    sizes = torch.randint(0, 3, (batch, kv_heads, clusters), generator=generator, dtype=torch.int32).to(device)
    return q, centroids, sizes


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, clusters, dim, dtype",
    [
        (2, 4, 2, 150, 64, torch.float32),  # more clusters than one chunk, batch 2
        (1, 6, 2, 37, 32, torch.bfloat16),  # group 3
        (3, 8, 1, 20, 128, torch.float16),  # group 8
        (1, 3, 3, 9, 256, torch.float32),  # group 1
        (1, 12, 4, 70, 16, torch.bfloat16),
    ],
)
def test_kernel_and_reference_match_a_cluster_loop(batch, q_heads, kv_heads, clusters, dim, dtype, poison_outputs):
    q, centroids, sizes = _inputs(batch, q_heads, kv_heads, clusters, dim, dtype)
    expected = _loop(q, centroids, sizes)
    for got in (
        centroid_scores_triton(q, centroids, sizes),
        centroid_scores_reference(q, centroids, sizes),
        centroid_scores(q, centroids, sizes),
    ):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got.double()[finite], expected[finite], rtol=1e-5, atol=1e-4)


def test_mismatched_shapes_are_refused():
    q, centroids, sizes = _inputs(1, 4, 2, 10, 16, torch.float32)
    with pytest.raises(ValueError, match="sizes"):
        centroid_scores_reference(q, centroids, sizes[..., :5])
    with pytest.raises(ValueError, match="centroids"):
        centroid_scores_reference(q, centroids[..., :8], sizes)
    with pytest.raises(ValueError, match="must be"):
        centroid_scores_triton(q, centroids, sizes[..., :5])


@pytest.mark.gpu
@pytest.mark.parametrize("q_heads, kv_heads, dim", [(32, 8, 128), (28, 4, 64), (8, 8, 256)])
def test_kernel_on_gpu_matches_the_reference(q_heads, kv_heads, dim):
    q, centroids, sizes = _inputs(3, q_heads, kv_heads, 8191, dim, torch.bfloat16, device="cuda")
    torch.testing.assert_close(
        centroid_scores(q, centroids, sizes), centroid_scores_reference(q, centroids, sizes), rtol=1e-5, atol=1e-3
    )
