"""Paged KV cache: tokens never lost or reordered across appends and crops; page and super-page summaries equal
recomputation; device state written in place."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.decode import PagedKVCache


def _check_against_model(cache: PagedKVCache, model_k, model_v):
    """Every sequence reads back in order, page tables are disjoint, and every summary equals recomputation."""
    page_size = cache.page_size
    seen = set()
    means = cache.page_key_means()
    for b in range(cache.batch):
        length = model_k[b].shape[1]
        assert cache.lengths[b] == length == int(cache.seq_lens[b])
        keys, values = cache.sequence(b)
        assert torch.equal(keys, model_k[b]) and torch.equal(values, model_v[b])
        pages = cache.page_table[b, : cache.num_pages()[b]].tolist()
        assert len(pages) == -(-length // page_size) == int(cache.page_counts[b]) and not seen & set(pages)
        seen |= set(pages)
        for i, page in enumerate(pages):
            rows = model_k[b][:, i * page_size : (i + 1) * page_size]  # (Hkv, n, D)
            assert torch.equal(cache.key_min[page], rows.amin(1))
            assert torch.equal(cache.key_max[page], rows.amax(1))
            assert torch.allclose(means[page], rows.float().mean(1), atol=1e-5)
            if cache.labels is not None:
                channels = cache.label_channels[:, None, :].expand(-1, rows.shape[1], -1)
                assert torch.equal(cache.labels[page, :, : rows.shape[1]], torch.gather(rows, 2, channels))
        span = page_size * cache.super_page
        supers = -(-length // span)
        for j in range(supers):
            rows = model_k[b][:, j * span : (j + 1) * span]
            assert torch.equal(cache.super_min[b, j], rows.amin(1))
            assert torch.equal(cache.super_max[b, j], rows.amax(1))
            assert torch.allclose(cache.super_sum[b, j], rows.float().sum(1), rtol=1e-5, atol=1e-4)
        # Super-pages past the sequence hold the identities (they never win a max or lose a min; they sum nothing).
        assert torch.isposinf(cache.super_min[b, supers:]).all() and torch.isneginf(cache.super_max[b, supers:]).all()
        assert not cache.super_sum[b, supers:].any()


@pytest.mark.parametrize(
    "page_size, super_page, dtype", [(4, 2, torch.float32), (16, 16, torch.bfloat16), (5, 3, torch.float16)]
)
def test_appends_and_crops_keep_tokens_and_summaries(page_size, super_page, dtype):
    generator = torch.Generator().manual_seed(page_size)
    batch, kv_heads, dim = 3, 2, 8
    cache = PagedKVCache(
        batch, kv_heads, dim, page_size=page_size, dtype=dtype, capacity_tokens=page_size, super_page=super_page
    )
    model_k = [torch.zeros(kv_heads, 0, dim, dtype=dtype) for _ in range(batch)]
    model_v = [x.clone() for x in model_k]
    for step in range(14):
        if step == 6:
            channels = torch.stack([torch.randperm(dim, generator=generator)[:3] for _ in range(kv_heads)])
            cache.set_label_channels(channels)
        if step % 5 == 4:
            limit = int(torch.randint(0, max(x.shape[1] for x in model_k) + 2, (1,), generator=generator))
            cache.crop(limit)
            model_k = [x[:, :limit] for x in model_k]
            model_v = [x[:, :limit] for x in model_v]
        else:
            tokens = 1 if step % 2 else int(torch.randint(1, 3 * page_size, (1,), generator=generator))
            lengths = torch.randint(0, tokens + 1, (batch,), generator=generator).tolist()
            k = torch.randn(batch, kv_heads, tokens, dim, generator=generator).to(dtype)
            v = torch.randn(batch, kv_heads, tokens, dim, generator=generator).to(dtype)
            cache.append(k, v, lengths)
            model_k = [torch.cat([model_k[b], k[b, :, : lengths[b]]], 1) for b in range(batch)]
            model_v = [torch.cat([model_v[b], v[b, :, : lengths[b]]], 1) for b in range(batch)]
        _check_against_model(cache, model_k, model_v)
    assert cache.capacity >= sum(cache.num_pages())


def test_device_state_is_written_in_place():
    """While the page table keeps its width, appends and crops update the same tensors (what a decode step
    captured in a CUDA graph reads)."""
    cache = PagedKVCache(2, 1, 4, page_size=4, capacity_tokens=64)
    cache.append(torch.randn(2, 1, 9, 4), torch.randn(2, 1, 9, 4))
    tensors = [cache.page_table, cache.seq_lens, cache.page_counts, cache.super_min, cache.k_pages, cache.key_min]
    pointers = [x.data_ptr() for x in tensors]
    cache.append(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4), [1, 0])  # 10 and 9 tokens: still 3 pages
    cache.crop(9)
    assert [x.data_ptr() for x in tensors] == pointers
    assert cache.seq_lens.tolist() == [9, 9] and cache.page_counts.tolist() == [3, 3]


def test_crop_returns_pages_for_reuse():
    cache = PagedKVCache(2, 1, 4, page_size=4)
    cache.append(torch.randn(2, 1, 16, 4), torch.randn(2, 1, 16, 4))
    capacity = cache.capacity
    cache.crop(3)
    cache.append(torch.randn(2, 1, 13, 4), torch.randn(2, 1, 13, 4))
    assert cache.capacity == capacity and cache.lengths == [16, 16]


def test_bad_input_is_refused_with_the_argument_named():
    cache = PagedKVCache(2, 2, 8, page_size=4)
    k = torch.randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match="a cache from another model"):
        cache.append(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8))
    with pytest.raises(TypeError, match="k must have the cache's dtype"):
        cache.append(k.half(), k.half())
    with pytest.raises(ValueError, match="v must have k's shape"):
        cache.append(k, k[:, :, :2])
    with pytest.raises(ValueError, match=r"lengths\[i\] must be <= the 3 tokens"):
        cache.append(k, k, [4, 1])
    with pytest.raises(ValueError, match="one entry per sequence"):
        cache.append(k, k, [1])
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        PagedKVCache(1, 1, 8, page_size=0)
    with pytest.raises(ValueError, match="max_length must be >= 0"):
        cache.crop(-1)
    with pytest.raises(ValueError, match=r"channels must lie in \[0, 8\)"):
        cache.set_label_channels(torch.tensor([[0, 8], [1, 2]]))
    with pytest.raises(ValueError, match=r"channels must have shape \(2, r\)"):
        cache.set_label_channels(torch.tensor([[0, 1]]))
