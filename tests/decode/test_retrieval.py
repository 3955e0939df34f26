"""The ``retrieval`` decode method: its k-means against a loop, its selection against a cluster-by-cluster
reference, the index growing with appends without losing a token, and a planted key found."""

from __future__ import annotations

import pytest
import torch
from helpers import relative_error
from test_methods import CASES, _cache, _dense_oracle, _selected_sets

from sparse_attn.decode import PagedKVCache, sparse_decode
from sparse_attn.decode.methods.retrieval import RetrievalConfig, kmeans

SMALL = {"sink_tokens": 2, "window_tokens": 4, "update_tokens": 6, "cluster_size": 4, "segment_tokens": 24}


def _kmeans_loop(points, clusters, iters):
    """Lloyd's iterations one point at a time (float64), from evenly spaced points."""
    n = points.shape[0]
    centroids = [points[(i * n) // clusters].double().clone() for i in range(clusters)]
    for _ in range(iters + 1):
        assign = [min(range(clusters), key=lambda c: float((p.double() - centroids[c]).square().sum())) for p in points]
        for c in range(clusters):
            members = [points[i].double() for i in range(n) if assign[i] == c]
            if members:
                centroids[c] = torch.stack(members).mean(0)
    return torch.stack(centroids), torch.tensor(assign)


@pytest.mark.parametrize("rows, n, dim, clusters, iters", [(3, 37, 8, 5, 4), (2, 16, 16, 16, 2), (1, 9, 4, 1, 3)])
def test_kmeans_matches_a_point_by_point_loop(rows, n, dim, clusters, iters):
    x = torch.randn(rows, n, dim)
    centroids, assign, sizes = kmeans(x, clusters, iters)
    for r in range(rows):
        expected_centroids, expected_assign = _kmeans_loop(x[r], clusters, iters)
        assert torch.equal(assign[r], expected_assign)
        torch.testing.assert_close(centroids[r].double(), expected_centroids, rtol=1e-5, atol=1e-5)
        assert sizes[r].tolist() == torch.bincount(expected_assign, minlength=clusters).tolist()
    with pytest.raises(ValueError, match="clusters must be in"):
        kmeans(x, n + 1, 1)


def _retrieval_reference(q, cache, index, budget):
    """Per (sequence, KV head): the sinks, every token from the index's end on, and the members of the
    best clusters by the group-summed q . centroid (float64) while they fit the rest of the budget."""
    group = q.shape[1] // cache.kv_heads
    config = index.config
    chosen = []
    for b in range(cache.batch):
        length = cache.lengths[b]
        sinks = set(range(min(config.sink_tokens, length)))
        tail = set(range(max(index.indexed_end[b], config.sink_tokens), length))
        rows = []
        for h in range(cache.kv_heads):
            query = q[b, h * group : (h + 1) * group].double().sum(0)
            clusters = []
            for segment in index.segments[b]:
                start = 0
                for c in range(segment.sizes.shape[1]):
                    size = int(segment.sizes[h, c])
                    members = set(segment.members[h, start : start + size].tolist())
                    clusters.append((float(segment.centroids[h, c].double() @ query), members))
                    start += size
            room = budget - len(sinks) - len(tail)
            picked = set()
            for _, members in sorted(clusters, key=lambda item: -item[0]):
                if len(members) > room:
                    break
                picked |= members
                room -= len(members)
            rows.append(sinks | tail | picked)
        chosen.append(rows)
    return chosen


def _index(cache):
    (index,) = [value for key, value in cache.selection_memo.items() if key[0] == "retrieval"]
    return index


@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size", CASES)
@pytest.mark.parametrize("budget", [20, 33])
def test_retrieval_matches_a_cluster_by_cluster_reference(lengths, q_heads, kv_heads, dim, page_size, budget):
    cache = _cache(lengths, kv_heads, dim, page_size, seed=21)
    q = torch.randn(len(lengths), q_heads, dim)
    out, selection = sparse_decode(q, cache, "retrieval", token_budget=budget, return_selection=True, **SMALL)
    index = _index(cache)
    expected = _retrieval_reference(q, cache, index, budget)
    counts = selection.counts.tolist()
    for b in range(cache.batch):
        for h in range(kv_heads):
            tokens = selection.selected[b, h, : counts[b][h]].tolist()
            assert len(tokens) == len(set(tokens)) <= budget
            assert set(tokens) == expected[b][h], (b, h)
            # The index: its members split [sinks, indexed_end) once, centroids are their keys' means.
            keys, _ = cache.sequence(b)
            members = torch.cat([s.members[h] for s in index.segments[b]]).tolist()
            assert sorted(members) == list(range(SMALL["sink_tokens"], index.indexed_end[b]))
            for segment in index.segments[b]:
                start = 0
                for c, size in enumerate(segment.sizes[h].tolist()):
                    if size:
                        mean = keys[h, segment.members[h, start : start + size].long()].mean(0)
                        torch.testing.assert_close(segment.centroids[h, c], mean, rtol=1e-5, atol=1e-5)
                    start += size
    reference = sparse_decode(q, cache, "dense")
    assert out.shape == reference.shape and torch.isfinite(out).all()


def test_the_index_grows_with_appends_and_never_loses_a_token():
    """Decode 40 single tokens into two sequences: the index extends once update_tokens gather past the
    window, every token is indexed, static or a sink at every step, and a covering budget equals dense."""
    generator = torch.Generator().manual_seed(3)
    cache = PagedKVCache(2, 2, 8, page_size=4)
    cache.append(torch.randn(2, 2, 30, 8, generator=generator), torch.randn(2, 2, 30, 8, generator=generator), [30, 11])
    ends = []
    for step in range(40):
        q = torch.randn(2, 4, 8, generator=generator)
        out = sparse_decode(q, cache, "retrieval", token_budget=200, **SMALL)
        assert relative_error(out, _dense_oracle(q, cache)) <= 1e-5, step
        index = _index(cache)
        for b in range(2):
            indexed = {t for s in index.segments[b] for t in s.members[0].tolist()}
            static = set(range(min(2, cache.lengths[b]))) | set(range(max(index.indexed_end[b], 2), cache.lengths[b]))
            assert not indexed & static and indexed | static == set(range(cache.lengths[b])), (step, b)
            assert cache.lengths[b] - index.indexed_end[b] < SMALL["window_tokens"] + SMALL["update_tokens"]
        ends.append(list(index.indexed_end))
        new = torch.randn(2, 2, 1, 8, generator=generator)
        cache.append(new, new)
    assert ends[0] == [26, 7] and ends[-1][0] > 60 and len({tuple(e) for e in ends}) > 5
    cache.crop(20)  # a crop drops the index; the next step builds it again
    assert not cache.selection_memo
    sparse_decode(torch.randn(2, 4, 8), cache, "retrieval", token_budget=200, **SMALL)
    assert _index(cache).indexed_end == [16, 16]


def test_retrieval_finds_a_planted_key():
    generator = torch.Generator().manual_seed(4)
    cache = PagedKVCache(1, 1, 32, page_size=16)
    keys = torch.randn(1, 1, 4000, 32, generator=generator)
    q = torch.randn(1, 2, 32, generator=generator)
    keys[0, 0, 1777] = 6 * q[0].sum(0) / q[0].sum(0).norm()
    cache.append(keys, torch.randn(1, 1, 4000, 32, generator=generator))
    _, selection = sparse_decode(q, cache, "retrieval", token_budget=256, return_selection=True, window_tokens=16,
                                 update_tokens=16)  # fmt: skip
    tokens = selection.selected[0, 0, : selection.counts[0, 0]].tolist()
    assert 1777 in tokens and len(tokens) <= 256


def test_retrieval_options_are_checked():
    with pytest.raises(ValueError, match=r"token_budget \(196\) must exceed"):
        RetrievalConfig(token_budget=196)
    RetrievalConfig(token_budget=197)
    for name in ("cluster_size", "segment_tokens", "update_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            RetrievalConfig(**{name: 0})
    with pytest.raises(TypeError, match="window_tokens must be an int"):
        RetrievalConfig(window_tokens=1.5)


def test_reselect_every_keeps_the_retrieved_tokens_and_adds_the_new_ones():
    """With reselect_every=4 a search serves 4 steps: each later step reads the searched step's tokens plus
    those appended since, whatever its query; an index update or the 5th step searches again."""
    generator = torch.Generator().manual_seed(5)
    cache = PagedKVCache(2, 2, 8, page_size=4)
    cache.append(torch.randn(2, 2, 90, 8, generator=generator), torch.randn(2, 2, 90, 8, generator=generator), [90, 61])
    options = dict(SMALL, update_tokens=30, reselect_every=4)
    searched = None
    for step in range(12):
        q = torch.randn(2, 4, 8, generator=generator)
        _, selection = sparse_decode(q, cache, "retrieval", token_budget=48, return_selection=True, **options)
        once = dict(options, reselect_every=1)
        fresh = sparse_decode(q, cache, "retrieval", token_budget=48, return_selection=True, **once)[1]
        index = next(v for k, v in cache.selection_memo.items() if k[1].reselect_every == 4)
        sets = _selected_sets(selection)
        if step % 4 == 0:
            assert sets == _selected_sets(fresh), step  # a search step selects as without reuse
            searched, lengths = sets, list(cache.lengths)
        else:
            for b in range(2):
                new = set(range(lengths[b], cache.lengths[b]))
                assert all(sets[b][h] == searched[b][h] | new for h in range(2)), (step, b)
                assert all(len(sets[b][h]) <= 48 + 3 for h in range(2))
        assert index.search is not None
        new = torch.randn(2, 2, 1, 8, generator=generator)
        cache.append(new, new)
    # An index update inside the reuse window (update_tokens 2 < reselect_every 8) forces a new search.
    options, once = dict(SMALL, update_tokens=2, reselect_every=8), dict(SMALL, update_tokens=2)
    updates, ends = 0, None
    for step in range(6):
        q = torch.randn(2, 4, 8, generator=generator)
        _, selection = sparse_decode(q, cache, "retrieval", token_budget=48, return_selection=True, **options)
        fresh = sparse_decode(q, cache, "retrieval", token_budget=48, return_selection=True, **once)[1]
        index = next(v for k, v in cache.selection_memo.items() if k[1].reselect_every == 8)
        if ends is not None and index.indexed_end != ends:
            updates += 1
            assert _selected_sets(selection) == _selected_sets(fresh), step
        ends = list(index.indexed_end)
        new = torch.randn(2, 2, 1, 8, generator=generator)
        cache.append(new, new)
    assert updates >= 2
    with pytest.raises(ValueError, match="reselect_every must be >= 1"):
        RetrievalConfig(reselect_every=0)
