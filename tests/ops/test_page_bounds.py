"""Page bounds operator (Quest): the kernel (interpreter) and the reference against a page-by-page loop of each
head's bound summed over its GQA group; GPU."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.decode import PagedKVCache
from sparse_attn.ops.page_bounds import page_bounds
from sparse_attn.ops.page_bounds.naive import page_bounds_reference
from sparse_attn.ops.page_bounds.triton import page_bounds_triton


def _cache(lengths, kv_heads, dim, page_size, dtype, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(len(lengths), kv_heads, dim, page_size=page_size, dtype=dtype, device=device)
    k = torch.randn(len(lengths), kv_heads, max(lengths), dim, generator=generator).to(dtype=dtype, device=device)
    cache.append(k, torch.zeros_like(k), list(lengths))
    return cache


def _loop_bounds(q, cache, scale):
    batch, q_heads, _ = q.shape
    group = q_heads // cache.kv_heads
    out = torch.full((batch, cache.kv_heads, cache.page_table.shape[1]), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        keys, _ = cache.sequence(b)
        for page in range(-(-cache.lengths[b] // cache.page_size)):
            out[b, :, page] = 0.0
            for h in range(q_heads):
                rows = keys[h // group, page * cache.page_size : (page + 1) * cache.page_size].double().cpu()
                qh = q[b, h].double().cpu()
                bound = torch.maximum(qh * rows.min(0).values, qh * rows.max(0).values).sum()
                out[b, h // group, page] += bound * scale
    return out


@pytest.mark.parametrize(
    "lengths, q_heads, kv_heads, dim, page_size, dtype",
    [
        ((70, 23, 130), 4, 2, 64, 8, torch.float32),  # more pages than one BLOCK_P chunk, batch 3
        ((50,), 6, 2, 32, 16, torch.bfloat16),  # group 3
        ((40, 90), 8, 1, 128, 4, torch.float16),  # group 8
        ((33,), 12, 4, 256, 16, torch.float32),
    ],
)
def test_kernel_and_reference_match_a_page_loop(lengths, q_heads, kv_heads, dim, page_size, dtype, poison_outputs):
    cache = _cache(lengths, kv_heads, dim, page_size, dtype)
    q = torch.randn(len(lengths), q_heads, dim).to(dtype)
    expected = _loop_bounds(q, cache, 0.5)
    arguments = (q, cache.key_min, cache.key_max, cache.page_table, cache.seq_lens)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for got in (
        page_bounds_triton(*arguments, page_size=page_size, scale=0.5),
        page_bounds_reference(*arguments, page_size=page_size, scale=0.5),
        page_bounds(*arguments, page_size=page_size, scale=0.5),
    ):
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
        finite = torch.isfinite(expected)
        assert torch.allclose(got.double()[finite], expected[finite], rtol=tolerance, atol=tolerance)
    newest = torch.tensor([-(-n // page_size) - 1 for n in lengths])
    for got in (
        page_bounds_triton(*arguments, page_size=page_size, scale=0.5, newest_first=True),
        page_bounds_reference(*arguments, page_size=page_size, scale=0.5, newest_first=True),
    ):
        assert torch.isposinf(got).sum() == len(lengths) * kv_heads
        assert torch.isposinf(got[torch.arange(len(lengths)), :, newest]).all()


@pytest.mark.gpu
def test_kernel_matches_reference_on_gpu():
    cache = _cache((131072, 5000, 70001), 8, 128, 16, torch.bfloat16, device="cuda", seed=1)
    q = torch.randn(3, 32, 128, device="cuda", dtype=torch.bfloat16)
    arguments = (q, cache.key_min, cache.key_max, cache.page_table, cache.seq_lens)
    got = page_bounds_triton(*arguments, page_size=16, scale=128**-0.5)
    expected = page_bounds_reference(*arguments, page_size=16, scale=128**-0.5)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    assert torch.allclose(got[finite], expected[finite], rtol=2e-2, atol=2e-2)
