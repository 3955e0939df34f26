"""Decode methods: each selection rule against a loop-by-loop PyTorch reference, sparse equals dense when the
budget covers the cache, TidalDecode's layer schedule, option checks, and the kernel on the methods' selections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error

from sparse_attn.decode import (
    PagedKVCache,
    calibrate_label_channels,
    get_decode_method,
    list_decode_methods,
    sparse_decode,
)
from sparse_attn.ops.paged_decode.triton import paged_decode_triton

METHODS = ("dense", "streaming", "quest", "double_sparsity", "tidaldecode", "moba", "retrieval")


def _options(method, page_size):
    """Options the generic tests add: ``moba``'s blocks as small as the test caches' pages,
    ``retrieval``'s static part (sinks, window, update span) within their small budgets."""
    if method == "moba":
        return {"block_size": page_size}
    return {"window_tokens": 4, "update_tokens": 8, "cluster_size": 4} if method == "retrieval" else {}


def _cache(lengths, kv_heads, dim, page_size, seed, dtype=torch.float32):
    """A cache filled by a prefill chunk of variable lengths, then single tokens (interleaved page allocation)."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    cache = PagedKVCache(batch, kv_heads, dim, page_size=page_size, dtype=dtype)
    first = [max(1, n - 3) for n in lengths]
    chunk = max(first)
    cache.append(*(torch.randn(batch, kv_heads, chunk, dim, generator=generator).to(dtype) for _ in range(2)), first)
    for _ in range(3):
        rest = [int(cache.lengths[b] < lengths[b]) for b in range(batch)]
        cache.append(*(torch.randn(batch, kv_heads, 1, dim, generator=generator).to(dtype) for _ in range(2)), rest)
    assert cache.lengths == list(lengths)
    channels = calibrate_label_channels(
        torch.randn(1, kv_heads * 2, 40, dim, generator=generator),
        torch.randn(1, kv_heads, 40, dim, generator=generator),
    )
    cache.set_label_channels(channels)
    return cache


def _dense_oracle(q, cache):
    outs = []
    for b in range(cache.batch):
        k, v = cache.sequence(b)
        outs.append(F.scaled_dot_product_attention(q[b, :, None].double(), k.double(), v.double(), enable_gqa=True))
    return torch.stack(outs)[:, :, 0]


def _selected_sets(selection):
    counts = selection.counts.tolist()
    return [
        [set(selection.selected[b, h, : counts[b][h]].tolist()) for h in range(len(counts[b]))]
        for b in range(len(counts))
    ]


def _group_topk_reference(per_head_logits, length, group, budget, softmax=False):
    """Per KV head: each query head's logits over the first ``length`` entries (``softmax``: their
    softmax) summed over the group; the newest entry forced in; the ``budget`` best (float64)."""
    chosen = []
    for g in range(per_head_logits.shape[0] // group):
        logits = per_head_logits[g * group : (g + 1) * group, :length].double()
        score = (torch.softmax(logits, -1) if softmax else logits).sum(0)
        score[length - 1] = float("inf")
        chosen.append(set(score.topk(min(budget, length)).indices.tolist()))
    return chosen


CASES = [((70, 23, 41), 4, 2, 16, 8), ((37,), 6, 3, 32, 4), ((50, 9), 8, 1, 16, 16)]  # lengths, Hq, Hkv, D, P


@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size", CASES)
def test_quest_matches_a_page_by_page_reference(lengths, q_heads, kv_heads, dim, page_size):
    cache = _cache(lengths, kv_heads, dim, page_size, seed=1)
    q = torch.randn(len(lengths), q_heads, dim)
    budget = 3 * page_size
    _, selection = sparse_decode(q, cache, "quest", layer=2, token_budget=budget, return_selection=True)
    for b, length in enumerate(lengths):
        keys, _ = cache.sequence(b)
        pages = -(-length // page_size)
        bounds = torch.zeros(q_heads, pages, dtype=torch.float64)
        for h in range(q_heads):
            for p in range(pages):
                rows = keys[h // (q_heads // kv_heads), p * page_size : (p + 1) * page_size].double()
                qh = q[b, h].double()
                bounds[h, p] = torch.maximum(qh * rows.min(0).values, qh * rows.max(0).values).sum()
        expected = _group_topk_reference(bounds, pages, q_heads // kv_heads, 3)
        assert _selected_sets(selection)[b] == expected
    assert selection.select_block == page_size


@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size", CASES)
def test_double_sparsity_matches_a_token_by_token_reference(lengths, q_heads, kv_heads, dim, page_size):
    cache = _cache(lengths, kv_heads, dim, page_size, seed=2)
    q = torch.randn(len(lengths), q_heads, dim)
    _, selection = sparse_decode(q, cache, "double_sparsity", token_budget=10, return_selection=True)
    group = q_heads // kv_heads
    for b, length in enumerate(lengths):
        keys, _ = cache.sequence(b)
        approx = torch.zeros(q_heads, length, dtype=torch.float64)
        for h in range(q_heads):
            channels = cache.label_channels[h // group]
            approx[h] = keys[h // group][:, channels].double() @ q[b, h, channels].double()
        assert _selected_sets(selection)[b] == _group_topk_reference(approx, length, group, 10)
    assert selection.select_block == 1


def test_label_channel_calibration_matches_a_channel_loop():
    q, k = torch.randn(2, 6, 30, 32), torch.randn(2, 3, 30, 32)
    k[:, 1, :, 5] *= 20  # an outlier channel in KV head 1
    channels = calibrate_label_channels(q, k, 4)
    for g in range(3):
        statistic = torch.tensor(
            [(q[:, 2 * g : 2 * g + 2, :, c] * k[:, g : g + 1, :, c]).abs().mean().item() for c in range(32)]
        )
        assert channels[g].tolist() == sorted(statistic.topk(4).indices.tolist())
    assert 5 in channels[1].tolist() and calibrate_label_channels(q, k).shape == (3, 2)


@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size", CASES)
def test_tidaldecode_layers_reuse_the_selection_layers_tokens(lengths, q_heads, kv_heads, dim, page_size):
    cache = _cache(lengths, kv_heads, dim, page_size, seed=3)
    group = q_heads // kv_heads
    state = {"num_layers": 8}
    queries = [torch.randn(len(lengths), q_heads, dim) for _ in range(8)]
    selections = [
        sparse_decode(
            q,
            cache,
            "tidaldecode",
            layer=layer,
            state=state,
            token_budget=12,
            reselection_layer=None,
            return_selection=True,
        )[1]
        for layer, q in enumerate(queries)
    ]
    pages = [-(-n // page_size) for n in lengths]
    for layer in (0, 1, 2, 4):  # dense, dense, selection layer (full attention), re-selection layer 8 // 2
        assert selections[layer].select_block == page_size
        assert _selected_sets(selections[layer]) == [[set(range(n))] * kv_heads for n in pages]
    for layer, source in ((3, 2), (5, 4), (7, 4)):
        assert selections[layer].select_block == 1
        for b, length in enumerate(lengths):
            keys, _ = cache.sequence(b)
            logits = torch.stack([keys[h // group].double() @ queries[source][b, h].double() for h in range(q_heads)])
            expected = _group_topk_reference(logits * dim**-0.5, length, group, 12, softmax=True)
            assert _selected_sets(selections[layer])[b] == expected
    # A later layer that finds no selection (its selection layer did not run the method) selects:
    # it attends densely and leaves its choice for the next layers.
    lone = {"num_layers": 8}
    _, first = sparse_decode(queries[3], cache, "tidaldecode", layer=3, state=lone, return_selection=True)
    assert first.select_block == page_size and "tidaldecode" in lone
    _, reused = sparse_decode(queries[5], cache, "tidaldecode", layer=5, state=lone, return_selection=True)
    assert reused is lone["tidaldecode"]
    with pytest.raises(ValueError, match="num_layers"):
        sparse_decode(queries[0], cache, "tidaldecode", layer=2, state={}, reselection_layer=None)
    assert get_decode_method("tidaldecode").defaults()["reselection_layer"] == 13


def test_streaming_reads_sink_and_recent_pages():
    cache = _cache((100, 30, 64), 2, 8, 8, seed=4)
    _, selection = sparse_decode(
        torch.randn(3, 2, 8), cache, "streaming", token_budget=40, sink_tokens=9, return_selection=True
    )
    # 5 pages of 8 tokens: 2 sink pages (9 tokens) + the 3 newest pages; shorter sequences read everything.
    assert _selected_sets(selection) == [[{0, 1, 10, 11, 12}] * 2, [set(range(4))] * 2, [{0, 1, 5, 6, 7}] * 2]
    with pytest.raises(ValueError, match="at least one window page"):
        sparse_decode(torch.randn(3, 2, 8), cache, "streaming", token_budget=16, sink_tokens=9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size", CASES[:2])
def test_a_budget_covering_the_cache_equals_dense(method, lengths, q_heads, kv_heads, dim, page_size):
    cache = _cache(lengths, kv_heads, dim, page_size, seed=5)
    state = {"num_layers": 6}
    budget = -(-max(lengths) // page_size) * page_size
    for layer in range(6):
        q = torch.randn(len(lengths), q_heads, dim)
        out = sparse_decode(
            q, cache, method, layer=layer, state=state, token_budget=budget, **_options(method, page_size)
        )
        assert relative_error(out, _dense_oracle(q, cache)) <= 1e-5, layer


def test_the_kernel_runs_every_methods_selection(poison_outputs):
    cache = _cache((70, 23, 41), 2, 64, 16, seed=6)
    state = {"num_layers": 4}
    for method in METHODS:
        for layer in (2, 3):
            q = torch.randn(3, 4, 64)
            out, selection = sparse_decode(
                q, cache, method, layer=layer, state=state, token_budget=32, return_selection=True,
                **_options(method, 16),
            )  # fmt: skip
            kernel_out, _ = paged_decode_triton(
                q, cache.k_pages, cache.v_pages, cache.page_table, cache.seq_lens, selection.selected,
                selection.counts, scale=0.125, select_block=selection.select_block, num_splits=2,
            )  # fmt: skip
            assert relative_error(kernel_out, out) <= 1e-4, (method, layer)


@pytest.mark.parametrize("method", METHODS)
def test_bad_budgets_and_options_are_refused(method):
    cache = _cache((20,), 1, 8, 4, seed=7)
    q = torch.randn(1, 2, 8)
    for budget in (0, -5):
        with pytest.raises(ValueError, match="token_budget must be >= 1"):
            sparse_decode(q, cache, method, token_budget=budget)
    with pytest.raises(TypeError, match="token_budget must be an int"):
        sparse_decode(q, cache, method, token_budget=2.5)
    with pytest.raises(TypeError, match="has no option"):
        sparse_decode(q, cache, method, bogus=1)
    assert "token_budget" in get_decode_method(method).defaults()


def test_unknown_methods_and_mismatched_inputs_are_refused():
    cache = _cache((20,), 1, 8, 4, seed=8)
    with pytest.raises(ValueError, match="unknown decode method 'nope'"):
        sparse_decode(torch.randn(1, 2, 8), cache, "nope")
    with pytest.raises(ValueError, match="must hold at least one page"):
        sparse_decode(torch.randn(1, 2, 8), cache, "quest", layer=3, token_budget=3)
    with pytest.raises(ValueError, match="q must be"):
        sparse_decode(torch.randn(1, 2, 16), cache, "quest")
    with pytest.raises(ValueError, match="at least its own token"):
        sparse_decode(torch.randn(1, 2, 8), PagedKVCache(1, 1, 8), "dense")
    uncalibrated = PagedKVCache(1, 1, 8)
    uncalibrated.append(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    with pytest.raises(ValueError, match="calibrated label channels"):
        sparse_decode(torch.randn(1, 2, 8), uncalibrated, "double_sparsity")
    assert [m.name for m in list_decode_methods()] == sorted(METHODS)


def test_methods_command_lists_the_decode_methods(capsys):
    from sparse_attn.cli import main

    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    for method in list_decode_methods():
        assert f"{method.name} (decode)" in printed and method.paper in printed
    assert "token_budget=2048" in printed


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_gpu_matches_the_reference_attention(method):
    from sparse_attn.decode.selection import topk_selection
    from sparse_attn.ops.page_bounds.naive import page_bounds_reference
    from sparse_attn.ops.paged_decode.naive import paged_decode_reference

    lengths, kv_heads = [32768, 5000, 20001], 8
    cache = PagedKVCache(3, kv_heads, 128, page_size=16, dtype=torch.bfloat16, device="cuda")
    for start in range(0, max(lengths), 4096):
        chunk = [min(4096, max(0, n - start)) for n in lengths]
        k, v = (torch.randn(3, kv_heads, 4096, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cache.append(k, v, chunk)
    cache.set_label_channels(torch.arange(8, device="cuda").expand(kv_heads, -1).contiguous())
    q = torch.randn(3, 32, 128, device="cuda", dtype=torch.bfloat16)
    state = {"num_layers": 8}
    for layer in (2, 3):
        out, selection = sparse_decode(
            q, cache, method, layer=layer, state=state, token_budget=2048, return_selection=True,
            **(_options(method, 256) if method != "retrieval" else {}),
        )  # fmt: skip
        expected, _ = paged_decode_reference(
            q, cache.k_pages, cache.v_pages, cache.page_table, cache.seq_lens, selection.selected,
            selection.counts, scale=128**-0.5, select_block=selection.select_block,
        )  # fmt: skip
        assert relative_error(out, expected) <= 1e-2, layer
    if method == "quest":
        bounds = page_bounds_reference(
            q, cache.key_min, cache.key_max, cache.page_table, cache.seq_lens, page_size=16, scale=1.0
        )
        reference = topk_selection(bounds, cache.page_counts, 128, 16)
        same = sum(
            len(a & b) for rows_a, rows_b in zip(_selected_sets(selection), _selected_sets(reference), strict=True)
            for a, b in zip(rows_a, rows_b, strict=True)
        )  # fmt: skip
        assert same >= 0.98 * int(reference.counts.sum())


def test_quest_two_levels_cover_one_level_and_check_options():
    cache = _cache((70, 23, 41), 2, 16, 4, seed=9)
    q = torch.randn(3, 4, 16)
    budget = 3 * 4
    _, one = sparse_decode(q, cache, "quest", layer=2, token_budget=budget, return_selection=True)
    # oversample large enough that every super-page is kept: exactly one-level Quest.
    _, two = sparse_decode(
        q, cache, "quest", layer=2, token_budget=budget, levels=2, oversample=64, return_selection=True
    )
    assert torch.equal(one.selected, two.selected) and torch.equal(one.counts, two.counts)
    _, tight = sparse_decode(q, cache, "quest", layer=2, token_budget=budget, levels=2, return_selection=True)
    assert torch.equal(tight.counts, one.counts)
    with pytest.raises(ValueError, match="levels must be 1 or 2"):
        sparse_decode(q, cache, "quest", levels=3)
    with pytest.raises(ValueError, match="oversample must be >= 1"):
        sparse_decode(q, cache, "quest", levels=2, oversample=0)


STEP_CASES = [
    ("dense", {}), ("streaming", {}), ("quest", {}), ("quest", {"levels": 2}), ("double_sparsity", {}),
    ("moba", {"block_size": 4}), ("retrieval", {"sink_tokens": 1, "window_tokens": 2, "update_tokens": 2}),
]  # fmt: skip


@pytest.mark.parametrize("method, options", [*STEP_CASES, ("tidaldecode", {})])
def test_a_decode_step_never_reads_device_values_on_the_host(method, options, monkeypatch):
    """No .item() / .tolist() / bool() / int() / float() of a tensor in a step (CUDA-graph capturable): run on
    the CPU path with those raising, and through the kernels' Python wrappers with the launches stubbed."""
    from sparse_attn.decode.selection import dense_selection
    from sparse_attn.ops.page_select import triton as select_kernels
    from sparse_attn.ops.paged_decode import triton as decode_kernels

    cache = _cache((70, 23, 41), 2, 16, 4, seed=10)
    q = torch.randn(3, 4, 16)
    launches = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step read a device value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with pytest.raises(AssertionError, match="on the host"):
        bool(cache.seq_lens.any())
    state = {"num_layers": 8}
    for layer in (2, 3):
        sparse_decode(q, cache, method, layer=layer, state=state, token_budget=8, **options)
    # The kernel wrappers, launches stubbed (the interpreter itself reads tensors on the host).
    for kernel in ("_chunk_topk", "_merge_topk", "_two_level"):
        monkeypatch.setattr(select_kernels, kernel, Stub(kernel), raising=False)
    monkeypatch.setattr(decode_kernels, "_paged_decode_split", Stub("split"))
    monkeypatch.setattr(decode_kernels, "_combine_splits", Stub("combine"))
    arguments = (q, cache.key_min, cache.key_max, cache.page_table, cache.page_counts)
    select_kernels.select_pages_triton(*arguments, 4, chunk=16)
    coarse = (*arguments[:3], cache.super_min, cache.super_max, cache.page_table, cache.page_counts)
    select_kernels.select_pages_two_level_triton(*coarse, 4, super_page=4, super_budget=3)
    selection = dense_selection(cache)
    decode_kernels.paged_decode_triton(
        q, cache.k_pages, cache.v_pages, cache.page_table, cache.seq_lens, selection.selected, selection.counts,
        scale=0.25, select_block=4, num_splits=2,
    )  # fmt: skip
    assert launches == ["_chunk_topk", "_merge_topk", "_two_level", "split", "combine"]


# On the GPU's 16-token pages moba's blocks must be whole pages: 256 (a super-page span: the
# cache's running super-page sums) and 64 (per-page sums through the page table).
# retrieval's index updates allocate and upload host state: not a CUDA-graph method (its docstring).
GPU_STEP_CASES = [case for case in STEP_CASES if case[0] not in ("moba", "retrieval")] + [
    ("moba", {"block_size": 256}),
    ("moba", {"block_size": 64}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("method, options", GPU_STEP_CASES)
def test_a_decode_step_replays_in_a_cuda_graph(method, options):
    """A step captured once replays the eager step, and after an append into the same page reads the new state."""
    lengths, kv_heads = [20003, 5002, 9001], 8
    cache = PagedKVCache(3, kv_heads, 128, page_size=16, dtype=torch.bfloat16, device="cuda", capacity_tokens=40000)
    k, v = (torch.randn(3, kv_heads, 20003, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cache.append(k, v, lengths)
    cache.set_label_channels(torch.arange(8, device="cuda").expand(kv_heads, -1).contiguous())
    q = torch.randn(3, 32, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        return sparse_decode(q, cache, method, layer=3, token_budget=1024, **options)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        graph.replay()
        torch.testing.assert_close(out, step(), rtol=0, atol=0)
        # The next token lands in each sequence's current page (the table keeps its width and buffers).
        new = torch.randn(3, kv_heads, 1, 128, device="cuda", dtype=torch.bfloat16)
        cache.append(new, new)
        q.copy_(torch.randn_like(q))


# MoBA at decode ---------------------------------------------------------------------------------
def _moba_reference(q, cache, block_size, top_k, sink_blocks=0):
    """Per (sequence, KV head): the set of logical pages of the newest block and of the best earlier
    blocks by the group-summed gate q · mean(K[block]) (float64, ties to the lower block)."""
    group = q.shape[1] // cache.kv_heads
    pages_per_block = block_size // cache.page_size
    chosen = []
    for b in range(cache.batch):
        keys, _ = cache.sequence(b)  # (Hkv, L, D)
        length = keys.shape[1]
        n_blocks = -(-length // block_size)
        rows = []
        for h in range(cache.kv_heads):
            query = q[b, h * group : (h + 1) * group].double().sum(0)
            gates = [
                float(keys[h, i * block_size : (i + 1) * block_size].double().mean(0) @ query) for i in range(n_blocks)
            ]
            sinks = list(range(min(sink_blocks, n_blocks - 1)))
            rest = sorted(range(len(sinks), n_blocks - 1), key=lambda i: (-gates[i], i))
            blocks = [*sinks, *rest[: top_k - 1 - len(sinks)], n_blocks - 1]
            pages = {p for i in blocks for p in range(i * pages_per_block, (i + 1) * pages_per_block)}
            rows.append({p for p in pages if p < cache.num_pages()[b]})
        chosen.append(rows)
    return chosen


@pytest.mark.parametrize("lengths, q_heads, kv_heads, dim, page_size", CASES)
@pytest.mark.parametrize("pages_per_block, super_page", [(1, 16), (2, 2), (4, 2), (3, 2)])
def test_moba_matches_a_block_by_block_reference(
    lengths, q_heads, kv_heads, dim, page_size, pages_per_block, super_page
):
    # Blocks of 2 or 4 pages with 2-page super-pages: block means from the super-page sums; 1 or 3 pages: from pages.
    cache = _cache(lengths, kv_heads, dim, page_size, seed=11)
    cache = _rebuilt(cache, super_page)
    block_size = pages_per_block * page_size
    q = torch.randn(len(lengths), q_heads, dim)
    for top_k, sink_blocks in ((1, 0), (2, 0), (3, 0), (2, 1), (3, 2)):
        _, selection = sparse_decode(
            q, cache, "moba", token_budget=top_k * block_size, block_size=block_size, return_selection=True,
            sink_blocks=sink_blocks,
        )  # fmt: skip
        assert _selected_sets(selection) == _moba_reference(q, cache, block_size, top_k, sink_blocks), top_k
        assert selection.counts.dtype == torch.int32 and selection.select_block == page_size


def _rebuilt(cache, super_page):
    """The same sequences in a cache with another super-page size."""
    other = PagedKVCache(cache.batch, cache.kv_heads, cache.head_dim, page_size=cache.page_size, super_page=super_page)
    sequences = [cache.sequence(b) for b in range(cache.batch)]
    longest = max(k.shape[1] for k, _ in sequences)
    k, v = (
        torch.stack([torch.nn.functional.pad(x[i], (0, 0, 0, longest - x[i].shape[1])) for x in sequences])
        for i in (0, 1)
    )
    other.append(k, v, [x.shape[1] for x, _ in sequences])
    return other


@pytest.mark.parametrize("block_size, super_page", [(32, 2), (24, 16)])
def test_moba_at_decode_selects_what_moba_at_prefill_gives_the_newest_token(block_size, super_page):
    import sparse_attn as sa

    generator = torch.Generator().manual_seed(12)
    q_heads, kv_heads, dim, length, top_k = 6, 2, 16, 150, 3
    q = torch.randn(1, q_heads, length, dim, generator=generator)
    k, v = (torch.randn(1, kv_heads, length, dim, generator=generator) for _ in range(2))
    pattern = sa.estimate(q, k, "moba", block_size=block_size, top_k=top_k, share_in_group=True)
    cache = PagedKVCache(1, kv_heads, dim, page_size=8, super_page=super_page)
    cache.append(k, v)
    _, selection = sparse_decode(
        q[:, :, -1], cache, "moba", token_budget=top_k * block_size, block_size=block_size, return_selection=True
    )
    for h in range(kv_heads):
        blocks = set(pattern.kv_indices[0, h, -1, : int(pattern.kv_counts[0, h, -1])].tolist())
        pages = set(selection.selected[0, h, : int(selection.counts[0, h])].tolist())
        assert {page * 8 // block_size for page in pages} == blocks


def test_moba_options_are_checked():
    cache = _cache((40,), 1, 8, 4, seed=13)
    q = torch.randn(1, 2, 8)
    with pytest.raises(ValueError, match="at least one block of block_size"):
        sparse_decode(q, cache, "moba", token_budget=8, block_size=16)
    with pytest.raises(ValueError, match="multiple of the page size"):
        sparse_decode(q, cache, "moba", token_budget=12, block_size=6)
    with pytest.raises(ValueError, match="sink block"):
        sparse_decode(q, cache, "moba", token_budget=8, block_size=4, sink_blocks=2)
    defaults = {"token_budget": 1536, "block_size": 512, "dense_layers": 0, "sink_blocks": 0}
    assert get_decode_method("moba").defaults() == defaults


@pytest.mark.parametrize("levels", [1, 2])
def test_quest_reselect_every_reuses_the_selection_and_adds_the_pages_opened_since(levels):
    page_size, steps = 4, 6  # a reuse may follow the selection by 5 tokens: two pages can open
    lengths = (30, 13, 21)  # 13: a full last page, so the next token opens one
    cache = _cache(lengths, 2, 16, page_size, seed=21)
    generator = torch.Generator().manual_seed(22)
    options = dict(token_budget=3 * page_size, levels=levels, reselect_every=steps)
    opened = False
    for step in range(2 * steps + 1):
        q = torch.randn(3, 4, 16, generator=generator)
        _, got = sparse_decode(q, cache, "quest", layer=2, return_selection=True, **options)
        _, fresh = sparse_decode(q, cache, "quest", layer=2, return_selection=True, **dict(options, reselect_every=1))
        if step % steps == 0:
            chosen, pages_then = _selected_sets(fresh), list(cache.num_pages())
            assert _selected_sets(got) == chosen, step
        else:  # the remembered pages and every page opened since, nothing else
            want = [
                [s | set(range(pages_then[b], cache.num_pages()[b])) for s in heads] for b, heads in enumerate(chosen)
            ]
            assert _selected_sets(got) == want, step
            assert got.counts.tolist() == [[len(s) for s in heads] for heads in want]
            opened |= want != chosen
        out = sparse_decode(q, cache, "quest", layer=2, **options)
        kernel_out, _ = paged_decode_triton(
            q, cache.k_pages, cache.v_pages, cache.page_table, cache.seq_lens, got.selected, got.counts,
            scale=16**-0.5, select_block=page_size, num_splits=2,
        )  # fmt: skip
        assert relative_error(kernel_out, out) <= 1e-4
        cache.append(*(torch.randn(3, 2, 1, 16, generator=generator) for _ in range(2)))
    assert opened  # some sequence opened pages while a selection was reused


def test_quest_reselect_every_with_a_covering_budget_equals_dense_and_crop_drops_the_memo():
    cache = _cache((29, 11), 2, 8, 4, seed=23)
    generator = torch.Generator().manual_seed(24)
    for _ in range(6):
        q = torch.randn(2, 4, 8, generator=generator)
        out = sparse_decode(q, cache, "quest", layer=3, token_budget=64, reselect_every=4)
        assert relative_error(out, _dense_oracle(q, cache)) <= 1e-5
        cache.append(*(torch.randn(2, 2, 1, 8, generator=generator) for _ in range(2)))
    assert cache.selection_memo
    cache.crop(20)  # frees pages a remembered selection may name
    assert not cache.selection_memo
    q = torch.randn(2, 4, 8, generator=generator)
    _, after = sparse_decode(q, cache, "quest", layer=3, token_budget=8, reselect_every=4, return_selection=True)
    _, fresh = sparse_decode(q, cache, "quest", layer=3, token_budget=8, return_selection=True)
    assert _selected_sets(after) == _selected_sets(fresh)
    with pytest.raises(ValueError, match="reselect_every must be >= 1"):
        sparse_decode(q, cache, "quest", reselect_every=0)
