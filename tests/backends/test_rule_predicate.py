"""Token rules as box predicates (:mod:`sparse_attn.rule_predicate`) in the forward kernels.

* The packed predicate equals the rule it stands for (``GridWindowRule.allowed``) on every
  (query, key) pair of small 1D/2D/3D layouts: border-shifted windows, dilation, GNA strides,
  text tokens before and after; empty ranges admit nothing; fields wider than 31 bits give no
  predicate (the kernels then read bitmasks).
* The group summaries never rule out a (query group, key group) tile that holds an allowed pair
  (every tile of every case, random 31-bit packings included), and rule out the others where
  the rule's ranges are intervals of positions (a 1D window).
* The Triton forward and backward (interpreter) evaluate the predicate without building any
  bitmask and match the reference backend.
* GPU (``-m gpu``): ``auto`` runs a neighbourhood rule on the Gluon kernel, and it and the Triton
  kernel match the reference at a real 3D size, forward and backward (the backward passes run
  the predicate too); the Gluon forward's warpgroups skip the steps the summaries rule out
  (counted on the host, so the comparison is not vacuous) with the same output and LSE bit for
  bit as without skipping.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import TOLERANCE, assert_backends_match_reference, random_qkv, relative_error

import sparse_attn as sa
from sparse_attn.backends import kernel_configs, resolve_backend
from sparse_attn.plan import plan_for, unseen_steps
from sparse_attn.rule_predicate import GROUP, box_allowed, box_visible, groups_may_see, kernel_predicate, pack_box

RULE_CASES = [
    dict(grid=(40,), window=7, dilation=3),
    dict(grid=(5, 6, 7), window=3),
    dict(grid=(4, 11, 11), window=(3, 5, 5), dilation=(1, 2, 2)),
    dict(grid=(12, 13), window=5, text_tokens=7),
    dict(grid=(12, 13), window=(3, 7), text_tokens=5, text_position="before"),
    dict(grid=(6, 8, 8), window=(3, 5, 5), stride=(1, 2, 4)),
    dict(grid=(9, 10, 12), window=(3, 5, 5), dilation=(3, 1, 2), text_tokens=3),
]


@pytest.mark.parametrize("options", RULE_CASES, ids=str)
def test_predicate_equals_the_rule_on_every_pair(options):
    length = math.prod(options["grid"]) + options.get("text_tokens", 0)
    q = torch.randn(1, 1, length, 16)
    pattern = sa.estimate(q, q, "neighborhood", causal=False, block_q=16, block_k=16, **options)
    assert pattern.token_rule is not None
    predicate = kernel_predicate(pattern)
    assert predicate.table.shape == (3, length) and predicate.table.dtype == torch.int32
    positions = torch.arange(length)
    want = pattern.token_rule.allowed(positions[:, None], positions[None, :])
    assert torch.equal(box_allowed(predicate, positions[:, None], positions[None, :]), want)
    assert kernel_predicate(pattern) is predicate  # cached on the pattern
    # The kernels' fused test: the same pairs, and keys past the end (a ragged last tile) hidden.
    keys = torch.arange(length + 19)
    fused = box_visible(predicate, positions[:, None], keys[None, :], length)
    assert torch.equal(fused[:, :length], want) and not fused[:, length:].any()


def assert_groups_sound(predicate, allowed: torch.Tensor) -> int:
    """Every (query group, key group) tile with an allowed pair passes :func:`groups_may_see`;
    returns how many tiles it rules out."""
    n = allowed.shape[0]
    groups = -(-n // GROUP)
    padded = torch.nn.functional.pad(allowed, (0, groups * GROUP - n, 0, groups * GROUP - n))
    holds = padded.view(groups, GROUP, groups, GROUP).any(3).any(1)
    index = torch.arange(groups)
    may = groups_may_see(predicate, index[:, None], index[None, :])
    assert not (holds & ~may).any(), "a tile holding an allowed pair was ruled out"
    assert predicate.groups.shape == (4, n // GROUP + 2)  # every group, and one past the end
    return int((~may).sum())


@pytest.mark.parametrize("options", RULE_CASES, ids=str)
def test_group_summaries_never_rule_out_an_allowed_pair(options):
    length = math.prod(options["grid"]) + options.get("text_tokens", 0)
    q = torch.randn(1, 1, length, 16)
    pattern = sa.estimate(q, q, "neighborhood", causal=False, block_q=16, block_k=16, **options)
    predicate = kernel_predicate(pattern)
    positions = torch.arange(length)
    assert_groups_sound(predicate, pattern.token_rule.allowed(positions[:, None], positions[None, :]))
    # The token table and the summaries are views of the one buffer the kernels read.
    assert predicate.table.data_ptr() == predicate.words.data_ptr()
    assert predicate.groups.data_ptr() == predicate.words[3 * length :].data_ptr()


def test_group_summaries_are_exact_for_a_one_dimensional_window():
    # 1D windows of 9 over 1,000 positions: query group g sees key groups g - 1 to g + 1 only.
    length = 1000
    q = torch.randn(1, 1, length, 16)
    pattern = sa.estimate(q, q, "neighborhood", causal=False, block_q=16, block_k=16, grid=(length,), window=9)
    predicate = kernel_predicate(pattern)
    positions = torch.arange(length)
    ruled_out = assert_groups_sound(predicate, pattern.token_rule.allowed(positions[:, None], positions[None, :]))
    groups = -(-length // GROUP)
    index = torch.arange(groups)
    may = groups_may_see(predicate, index[:, None], index[None, :])
    assert torch.equal(may, (index[:, None] - index[None, :]).abs() <= 1)
    assert ruled_out == groups * groups - (3 * groups - 2)


def test_pack_box_empty_ranges_and_width_limit():
    keys = [torch.tensor([0, 1, 2, 3])]
    low, high = [torch.tensor([1, 3, 2, 0])], [torch.tensor([2, 2, 3, 3])]  # query 1: empty range
    none = torch.zeros(4, dtype=torch.bool)
    predicate = pack_box(keys, low, high, [3], key_always=none, query_all=none)
    positions = torch.arange(4)
    got = box_allowed(predicate, positions[:, None], positions[None, :])
    want = (keys[0][None, :] >= low[0][:, None]) & (keys[0][None, :] <= high[0][:, None])
    assert torch.equal(got, want) and not got[1].any()
    # Keys every query sees, queries that see every key.
    always, everything = torch.tensor([False, False, True, False]), torch.tensor([False, True, False, False])
    predicate = pack_box(keys, low, high, [3], key_always=always, query_all=everything)
    got = box_allowed(predicate, positions[:, None], positions[None, :])
    assert torch.equal(got, (want & ~everything[:, None]) | always[None, :] | everything[:, None])
    # Three fields of 2**10 - 1 need 33 bits: no predicate.
    wide = [torch.zeros(4, dtype=torch.int64)] * 3
    assert pack_box(wide, wide, wide, [1023] * 3, key_always=none, query_all=none) is None
    assert pack_box(wide, wide, wide, [511] * 3, key_always=none, query_all=none) is not None


def test_fused_test_at_31_bits_with_keys_seen_by_all_and_queries_seeing_all():
    # Fields of 1023, 511 and 511 take 11 + 10 + 10 = 31 bits: the widest packing, where the
    # differences of a key every query sees (code -1) wrap around in 32 bits.
    maxima, n = [1023, 511, 511], 300
    generator = torch.Generator().manual_seed(3)

    def draw(top):
        return torch.randint(0, top + 1, (n,), generator=generator)

    keys = [draw(m) for m in maxima]
    lows = [draw(m) for m in maxima]
    highs = [torch.minimum(low + draw(m // 2), torch.tensor(m)) for low, m in zip(lows, maxima, strict=True)]
    always = torch.rand(n, generator=generator) < 0.1
    everything = torch.rand(n, generator=generator) < 0.1
    predicate = pack_box(keys, lows, highs, maxima, key_always=always, query_all=everything)
    assert predicate is not None and predicate.guard.bit_length() == 31
    rows, columns = torch.arange(n)[:, None], torch.arange(n + 7)[None, :]
    want = box_allowed(predicate, rows, columns.clamp(max=n - 1)) & (columns < n)
    inside = torch.ones(n, n, dtype=torch.bool)
    for key, low, high in zip(keys, lows, highs, strict=True):
        inside &= (key[None, :] >= low[:, None]) & (key[None, :] <= high[:, None])
    assert torch.equal(want[:, :n], inside | always[None, :] | everything[:, None])
    assert torch.equal(box_visible(predicate, rows, columns, n), want)
    # Random ranges over 300 positions: no tile holding an allowed pair is ruled out.
    assert_groups_sound(predicate, want[:, :n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_runs_the_predicate_without_bitmasks(dtype, poison_outputs):
    options = dict(grid=(3, 6, 8), window=(3, 3, 5), dilation=(1, 2, 1), tile=(1, 4, 4), text_tokens=5)
    length = math.prod(options["grid"]) + 5
    q, k, v = random_qkv(2, 2, 1, length, length, 32, seed=5)
    pattern = sa.estimate(q, k, "neighborhood", causal=False, block_q=16, block_k=16, **options)
    assert pattern.partial_entries() > 0
    plan = plan_for(pattern, causal=False)
    assert plan.predicate_lists is not None
    want = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference", return_lse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = sa.block_sparse_attention(
            *(x.to(dtype) for x in (q, k, v)), pattern, causal=False, backend="triton", return_lse=True
        )
    assert pattern.cached_plan("rule_bitmask") is None  # the forward built no bitmask
    assert relative_error(got[0], want[0]) <= TOLERANCE[dtype]
    assert relative_error(got[1], want[1]) <= (1e-4 if dtype == torch.float32 else 1e-3)
    if dtype != torch.float32:
        return
    # The backward evaluates the predicate too (no bitmask): gradients against the reference's.
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for backend, run_dtype in (("reference", torch.float32), ("triton", dtype)):
        leaves = [x.detach().to(run_dtype).requires_grad_() for x in (q, k, v)]
        sa.block_sparse_attention(*leaves, pattern, causal=False, backend=backend).backward(dout.to(run_dtype))
        grads.append([x.grad for x in leaves])
    assert pattern.cached_plan("rule_bitmask") is None
    # The predicate is evaluated on the entries the rule cuts only: the transposed lists mark them
    # (0; -1 for whole entries and padding), as many as the pattern's partial entries.
    marks = plan.transposed.rule_index
    used = torch.arange(marks.shape[-1]) < plan.transposed.q_counts[..., None]
    assert set(marks.unique().tolist()) <= {0, -1} and not (marks[~used] == 0).any()
    assert int((marks[used] == 0).sum()) == pattern.partial_entries()
    for got_grad, want_grad in zip(grads[1], grads[0], strict=True):
        assert torch.isfinite(got_grad).all() and relative_error(got_grad, want_grad) <= TOLERANCE[dtype]
    # Whole entries lead each list, and the list holds the same blocks.
    lists = plan.predicate_lists
    counts = pattern.kv_counts[0, 0]
    for row in range(pattern.num_q_blocks):
        n = int(counts[row])
        assert sorted(lists.kv_indices[0, 0, row, :n].tolist()) == pattern.kv_indices[0, 0, row, :n].tolist()
        assert int(lists.full_counts[0, 0, row]) <= n


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_neighborhood_on_gluon_and_triton_predicates_match_the_reference(dtype, poison_outputs):
    grid, window, tile = (8, 24, 40), (3, 7, 9), (2, 8, 8)
    layout = sa.layouts.Layout(grid, tile=tile, text_tokens=128)
    q, k, v = random_qkv(2, 6, 3, layout.seq_len, layout.seq_len, 128, dtype=dtype, device="cuda", seed=8)
    options = dict(grid=grid, window=window, tile=tile, text_tokens=128)  # 7808 = 61 x 128 tokens
    pattern = sa.estimate(q, k, "neighborhood", causal=False, **options)
    assert pattern.partial_entries() > 0 and kernel_predicate(pattern) is not None
    assert resolve_backend("auto", q, k, v, pattern, causal=False, return_lse=False) == "gluon"
    assert_backends_match_reference(q, k, v, pattern, ("auto", "triton"), dtype, causal=False)
    # A key length that is not a multiple of block_k (the fused test hides the last tile's
    # keys past the end): Gluon too, forward and backward against the reference.
    short_qkv = tuple(x[:, :, :-5].contiguous() for x in (q, k, v))
    short = sa.estimate(*short_qkv[:2], "neighborhood", causal=False, **dict(options, text_tokens=123))
    assert resolve_backend("auto", *short_qkv, short, causal=False, return_lse=False) == "gluon"
    assert_backends_match_reference(*short_qkv, short, ("auto", "triton"), dtype, causal=False)


def ruled_out_steps(pattern, block_n: int = 128) -> int:
    """How many (64-row half of a query block, ``block_n``-key step of a cut entry) pairs of the
    forward's lists the group summaries rule out: the steps the Gluon warpgroups skip."""
    plan = plan_for(pattern, causal=False)
    lists, predicate = plan.predicate_lists, kernel_predicate(pattern)
    offset = (pattern.seq_k - pattern.seq_q) // GROUP
    halves, per_step = pattern.block_q // GROUP, block_n // GROUP
    total = 0
    for row in range(pattern.num_q_blocks):
        n, whole = int(pattern.kv_counts[0, 0, row]), int(lists.full_counts[0, 0, row])
        blocks = lists.kv_indices[0, 0, row, whole:n].long()
        starts = (blocks[:, None] * pattern.block_k + torch.arange(0, pattern.block_k, block_n)).flatten() // GROUP
        keys = starts[:, None] + torch.arange(per_step)  # (steps, groups per step)
        queries = row * halves + offset + torch.arange(halves)
        may = groups_may_see(predicate.to("cpu"), queries[:, None, None], keys.cpu()[None])
        total += int((~may.any(-1)).sum())
    return total


@pytest.mark.parametrize("block_n", [128, 64])
@pytest.mark.parametrize("grid, text", [((24, 32, 48), 128), ((9, 20, 36), 7)])
def test_unseen_steps_counts_what_the_summaries_rule_out(grid, text, block_n):
    length = math.prod(grid) + text
    q = torch.zeros(1, 1, length, 128)
    pattern = sa.estimate(q, q, "neighborhood", causal=False, grid=grid, text_tokens=text)
    unseen, taken = unseen_steps(plan_for(pattern, causal=False), block_n=block_n)
    assert unseen == ruled_out_steps(pattern, block_n)
    cut = int((pattern.kv_counts - plan_for(pattern, causal=False).predicate_lists.full_counts).sum())
    assert taken == cut * 2 * (128 // block_n)  # two 64-row halves per query block
    assert 0 < unseen < taken or grid == (9, 20, 36)
    with pytest.raises(ValueError, match="block_n"):
        unseen_steps(plan_for(pattern, causal=False), block_n=256)
    dense = sa.estimate(q, q, "streaming", causal=True, sink_tokens=128, local_tokens=256)
    assert unseen_steps(plan_for(dense, causal=True)) == (0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("cut", [0, 5])
def test_gpu_gluon_skipping_unseen_steps_changes_no_result(cut, poison_outputs):
    # The neighbourhood defaults (7-wide windows, the chosen tile) over a 3D grid with text; ``cut``
    # tokens off the end make the last key tile ragged (the predicate's fused test).
    grid, text = (24, 32, 48), 128 - cut
    length = math.prod(grid) + text
    q, k, v = random_qkv(1, 2, 1, length, length, 128, dtype=torch.bfloat16, device="cuda", seed=21)
    pattern = sa.estimate(q, k, "neighborhood", causal=False, grid=grid, text_tokens=text)
    # (8, 4, 4) tiles: a quarter of the warpgroups' steps are ruled out (checked on CPU).
    unseen, taken = unseen_steps(plan_for(pattern, causal=False))
    assert unseen > 0.2 * taken
    assert resolve_backend("auto", q, k, v, pattern, causal=False, return_lse=True) == "gluon"

    def both(v):
        with kernel_configs(rule_skip_steps=False):
            want = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="gluon", return_lse=True)
        return sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="gluon", return_lse=True), want

    got, want = both(v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    reference = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference")
    assert relative_error(got[0].float(), reference.float()) <= TOLERANCE[torch.bfloat16]
    # A NaN in V reaches column 3 of every row of the query blocks that keep its block, skipped
    # steps included (their zero P still multiplies the tile), as without skipping.
    v = v.clone()
    v[0, 0, length // 3, 3] = float("nan")
    (out, lse), (want_out, want_lse) = both(v)
    assert out.isnan().any() and torch.equal(out.isnan(), want_out.isnan())
    assert torch.equal(out.nan_to_num(), want_out.nan_to_num()) and torch.equal(lse, want_lse)
