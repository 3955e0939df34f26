"""Page selection operator (Quest, one and two levels): the kernels (interpreter) select exactly the reference's set,
ties included; the reference against a page-by-page loop; two levels with a covering budget equal one level; bad
input; GPU sizes."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.decode import PagedKVCache
from sparse_attn.ops import page_select
from sparse_attn.ops.page_select import select_pages, select_pages_two_level
from sparse_attn.ops.page_select import triton as kernels
from sparse_attn.ops.page_select.naive import select_pages_reference, select_pages_two_level_reference

SENTINEL = -12345


@pytest.fixture
def poison_int_outputs(monkeypatch):
    """Kernel int32 outputs start as a sentinel: a test sees any entry a kernel leaves unwritten."""
    monkeypatch.setattr(kernels, "allocate_int32", lambda shape, device: torch.full(shape, SENTINEL, device=device))


def _cache(lengths, kv_heads, dim, page_size, super_page, *, integer, seed, device="cpu", dtype=torch.float32):
    """A cache of ``lengths`` tokens; ``integer``: keys in {-2..2}, so bounds are exact and ties frequent."""
    generator = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(
        len(lengths), kv_heads, dim, page_size=page_size, super_page=super_page, dtype=dtype, device=device
    )
    shape = (len(lengths), kv_heads, max(lengths), dim)
    k = torch.randint(-2, 3, shape, generator=generator).float() if integer else torch.randn(shape, generator=generator)
    k = k.to(device=device, dtype=dtype)
    cache.append(k, torch.zeros_like(k), list(lengths))
    return cache


def _query(batch, q_heads, dim, *, integer, seed, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, q_heads, dim)
    q = torch.randint(-2, 3, shape, generator=generator).float() if integer else torch.randn(shape, generator=generator)
    return q.to(device=device, dtype=dtype)


def _loop_scores(q, cache):
    """Per (sequence, KV head), each logical page's group bound summed head by head (float64), +inf at the newest."""
    group = q.shape[1] // cache.kv_heads
    rows = []
    for b in range(cache.batch):
        keys, _ = cache.sequence(b)
        keys = keys.double().cpu().repeat_interleave(group, 0)  # (Hq, S, D)
        qb = q[b].double().cpu()[:, None, :]
        pages = -(-cache.lengths[b] // cache.page_size)
        score = torch.zeros(cache.kv_heads, pages, dtype=torch.float64)
        for p in range(pages):
            block = keys[:, p * cache.page_size : (p + 1) * cache.page_size]  # (Hq, n, D)
            per_head = torch.maximum(qb * block.amin(1, keepdim=True), qb * block.amax(1, keepdim=True)).sum((1, 2))
            score[:, p] = per_head.view(cache.kv_heads, group).sum(1)
        score[:, -1] = float("inf")
        rows.append(score)
    return rows


def _sets(selected, counts):
    return [
        [set(selected[b, h, : counts[b, h]].tolist()) for h in range(selected.shape[1])]
        for b in range(selected.shape[0])
    ]


# lengths, q_heads, kv_heads, head_dim, page_size, super_page, budget (pages)
CASES = [
    ((150, 37, 400), 6, 2, 32, 4, 4, 16),  # batch 3, group 3, 100 pages: several chunks to merge
    ((211,), 4, 4, 16, 8, 2, 13),  # group 1, a budget that is not a power of two
    ((97, 260), 8, 1, 64, 16, 8, 64),  # group 8, budget beyond the shorter sequence
]


@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size, super_page, budget", CASES)
def test_kernels_select_the_reference_set_with_ties(
    lengths, q_heads, kv_heads, dim, page_size, super_page, budget, poison_int_outputs
):
    cache = _cache(lengths, kv_heads, dim, page_size, super_page, integer=True, seed=budget)
    q = _query(len(lengths), q_heads, dim, integer=True, seed=dim)
    arguments = (q, cache.key_min, cache.key_max, cache.page_table, cache.page_counts)
    expected = select_pages_reference(*arguments, budget)
    # Integer keys and queries: every bound is exact, so ranks (ties to the lower page) must agree entry by entry.
    # Default chunks: two chunks merged in the first two cases, one chunk writing the selection in the third.
    got = kernels.select_pages_triton(*arguments, budget)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    coarse = (q, cache.key_min, cache.key_max, cache.super_min, cache.super_max, cache.page_table, cache.page_counts)
    for super_budget in (-(-budget // super_page) + 1, 10**4):
        options = dict(super_page=super_page, super_budget=super_budget)
        want = select_pages_two_level_reference(*coarse, budget, **options)
        got = kernels.select_pages_two_level_triton(*coarse, budget, **options)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), super_budget
    # A covering super-page budget is one-level Quest.
    assert torch.equal(want[0], expected[0])


@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size, super_page, budget", CASES[1:])
def test_reference_matches_a_page_loop_and_kernel_agrees_on_random_floats(
    lengths, q_heads, kv_heads, dim, page_size, super_page, budget
):
    cache = _cache(lengths, kv_heads, dim, page_size, super_page, integer=False, seed=7)
    q = _query(len(lengths), q_heads, dim, integer=False, seed=8)
    arguments = (q, cache.key_min, cache.key_max, cache.page_table, cache.page_counts)
    reference = select_pages_reference(*arguments, budget)
    kernel = kernels.select_pages_triton(*arguments, budget)
    for b, scores in enumerate(_loop_scores(q, cache)):
        for h in range(kv_heads):
            count = min(budget, scores.shape[1])
            threshold = scores[h].topk(count).values[-1]
            for selected, counts in (reference, kernel):
                assert int(counts[b, h]) == count
                chosen = selected[b, h, :count].long()
                assert len(set(chosen.tolist())) == count
                # Every chosen page scores at least the count-th best, up to float32 rounding of the sums.
                assert (scores[h][chosen] >= threshold - 1e-4 * (1 + abs(threshold))).all()


def test_two_levels_equal_one_level_when_the_coarse_ranking_certifies_it():
    """Exactness rule of the docstring: when the budget-th kept page scores at least the best dropped
    super-page, the two-level set is the one-level set. Keys of 3 super-pages point along the query."""
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(32, generator=generator)
    k = 0.3 * torch.randn(2, 2, 2000, 32, generator=generator)
    for page in (2, 5, 9):  # super-pages of 8 pages of 4 tokens: tokens [32 j, 32 (j + 1))
        k[:, :, 32 * page : 32 * (page + 1)] += direction
    cache = PagedKVCache(2, 2, 32, page_size=4, super_page=8)
    cache.append(k, k, [2000, 1500])
    certified = 0
    for seed in range(3):
        q = direction + 0.3 * torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(seed))
        one = select_pages_reference(q, cache.key_min, cache.key_max, cache.page_table, cache.page_counts, 20)
        two = select_pages_two_level_reference(
            q, cache.key_min, cache.key_max, cache.super_min, cache.super_max, cache.page_table, cache.page_counts,
            20, super_page=8, super_budget=4,
        )  # fmt: skip
        table = cache.page_table.long()
        fine = page_select.naive.group_page_scores(q, cache.key_min[table], cache.key_max[table])
        coarse = page_select.naive.group_page_scores(q, cache.super_min, cache.super_max)
        for b in range(2):
            supers = -(-cache.num_pages()[b] // 8)
            for h in range(2):
                kept = fine[b, h][two[0][b, h, 1:].long()]  # rank 0: the newest page, kept whatever its bound
                dropped = set(range(supers - 1)) - {p // 8 for p in two[0][b, h].tolist()}
                if float(kept.min()) >= max(float(coarse[b, h, s]) for s in dropped):
                    certified += 1
                    assert set(two[0][b, h].tolist()) == set(one[0][b, h].tolist())
    assert certified >= 6


def test_bad_input_is_refused():
    cache = _cache((40,), 1, 16, 4, 4, integer=True, seed=0)
    q = _query(1, 2, 16, integer=True, seed=0)
    arguments = (q, cache.key_min, cache.key_max, cache.page_table, cache.page_counts)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        select_pages(*arguments, 0)
    with pytest.raises(ValueError, match="page_counts must be an int32"):
        select_pages(q, cache.key_min, cache.key_max, cache.page_table, cache.page_counts.long(), 4)
    with pytest.raises(ValueError, match="multiple of the 1 KV heads|key_min must be"):
        select_pages(q[:, :, :8], cache.key_min, cache.key_max, cache.page_table, cache.page_counts, 4)
    coarse = (q, cache.key_min, cache.key_max, cache.super_min, cache.super_max, cache.page_table, cache.page_counts)
    with pytest.raises(ValueError, match="cannot hold the budget"):
        select_pages_two_level(*coarse, 8, super_page=4, super_budget=2)
    with pytest.raises(ValueError, match="super_min must be"):
        select_pages_two_level(q, *coarse[1:3], cache.key_min, cache.key_max, *coarse[5:], 8, super_page=4,
                               super_budget=3)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("budget, super_budget", [(128, 17), (256, 33), (100, 10**4)])
def test_kernels_match_reference_on_gpu(budget, super_budget):
    lengths = (131072, 5000, 70001)
    cache = _cache(lengths, 8, 128, 16, 16, integer=False, seed=1, device="cuda", dtype=torch.bfloat16)
    q = _query(3, 32, 128, integer=False, seed=2, device="cuda", dtype=torch.bfloat16)
    arguments = (q, cache.key_min, cache.key_max, cache.page_table, cache.page_counts)
    coarse = (q, cache.key_min, cache.key_max, cache.super_min, cache.super_max, cache.page_table, cache.page_counts)
    options = dict(super_page=16, super_budget=super_budget)
    pairs = [
        (select_pages(*arguments, budget), select_pages_reference(*arguments, budget)),
        (
            select_pages_two_level(*coarse, budget, **options),
            select_pages_two_level_reference(*coarse, budget, **options),
        ),
    ]
    for (got, got_counts), (want, want_counts) in pairs:
        assert torch.equal(got_counts, want_counts)
        pairs_of_sets = zip(_sets(got, got_counts), _sets(want, want_counts), strict=True)
        same = sum(len(a & b) for ra, rb in pairs_of_sets for a, b in zip(ra, rb, strict=True))
        # float32 sums in another order: only near-ties at the threshold may differ.
        assert same >= 0.99 * int(want_counts.sum())
