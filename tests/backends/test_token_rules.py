"""Token rules inside the Triton block kernels (partial blocks as per-entry bitmasks), forward and backward.

A :class:`~sparse_attn.masked_pattern.MaskedPattern` with a token rule runs on the ``triton``
backend: the plan packs the rule of each partial entry into int32 words
(:func:`sparse_attn.plan.rule_bitmask`) and the forward, dQ and dK/dV kernels apply them.
Checked here on CPU under the interpreter at small shapes (batch 2, GQA 2, head_dim 64):

* a random token rule (a dense random table of allowed pairs, some rows with no key at all) on
  random patterns, causal and not, ``Sq < Sk``, odd lengths, lists per query head / KV head /
  shared, against a float64 dense oracle written here (empty rows: output 0, LSE -inf, zero
  gradients, never NaN);
* the spatial methods whose patterns carry a rule (``neighborhood`` in 2D and 3D with dilation 2
  and text tokens, ``sliding_tile`` on tiles that do not fill the blocks) against the reference
  backend, in float32 and bfloat16 (``radial`` and ``vmoba`` are block-exact: no rule to test);
* the bitmask table: its memory is that of the partial entries, and the rule is evaluated on
  partial entries only, in bounded chunks;
* routing: ``triton`` runs rule patterns, ``gluon`` / ``flash4`` by name fall back to it with one
  warning, ``auto`` stays on the reference backend on CPU, and cases the kernel cannot take
  (``block_q < 16``) fall back to the reference with one warning.

Outputs and gradients come from a NaN-poisoned allocator. GPU tests (``-m gpu``) at real sizes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TOLERANCE, assert_backends_match_reference, random_qkv, relative_error, shape_pattern, token_mask

import sparse_attn as sa
from sparse_attn import plan as plan_module
from sparse_attn.backends import resolve_backend
from sparse_attn.masked_pattern import MaskedPattern
from sparse_attn.plan import plan_for, rule_bitmask


class TableRule:
    """A token rule from a dense bool table ``(seq_k, seq_k)`` over absolute positions (tiny sizes)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def to(self, device) -> TableRule:
        return TableRule(self.table.to(device))

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        last = self.table.shape[0] - 1
        return self.table[q_pos.clamp(0, last), k_pos.clamp(0, last)]


def _random_rule_pattern(shape, *, heads: int, causal: bool, seed: int, empty_rows: int = 3) -> MaskedPattern:
    """A random block pattern with a random token rule; ``rule_partial`` marks exactly the
    entries the rule cuts, plus some it does not (marking a whole entry partial is allowed)."""
    batch, _, _, seq_q, seq_k, _, block_q, block_k = shape
    pattern = shape_pattern(shape, heads=heads, density=0.5, causal=causal, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand(seq_k, seq_k, generator=generator) < 0.6
    # Whole block pairs (all allowed) next to cut ones, so both kinds of entry occur.
    n_kv = pattern.num_kv_blocks
    pair_whole = torch.rand(n_kv, n_kv, generator=generator) < 0.4
    whole = pair_whole.repeat_interleave(block_k, 0).repeat_interleave(block_k, 1)[:seq_k, :seq_k]
    table |= whole
    # Some queries see nothing (their rows are empty even inside kept blocks).
    offset = seq_k - seq_q
    rows = torch.randperm(seq_q, generator=generator)[:empty_rows] + offset
    table[rows] = False
    rule = TableRule(table)
    used = torch.arange(pattern.max_kv) < pattern.kv_counts[..., None]
    q_block = torch.arange(pattern.num_q_blocks)[:, None].expand_as(pattern.kv_indices)
    key_block = pattern.kv_indices.long()
    # Per entry: does the rule cut it (some in-range pair not allowed)?
    padded = torch.ones(pattern.num_q_blocks * block_q, n_kv * block_k, dtype=torch.bool)
    padded[:seq_q, :seq_k] = table[offset:, :]
    per_pair = padded.view(pattern.num_q_blocks, block_q, n_kv, block_k).all(3).all(1)  # (n_q, n_kv)
    cut = ~per_pair[q_block, key_block]
    extra = torch.rand(pattern.kv_indices.shape, generator=generator) < 0.2
    rule_partial = (cut | extra) & used
    return MaskedPattern(
        kv_counts=pattern.kv_counts,
        kv_indices=pattern.kv_indices,
        block_q=block_q,
        block_k=block_k,
        seq_q=seq_q,
        seq_k=seq_k,
        token_rule=rule,
        rule_partial=rule_partial,
    )


def _rule_oracle(q, k, v, pattern: MaskedPattern, causal: bool, dout, dlse):
    """Float64 output, LSE and gradients of ``sum(out * dout) + sum(lse * dlse)`` over the token
    mask (kept blocks, causal, rule); rows with no key give output 0, LSE -inf, zero gradient."""
    batch, q_heads, seq_q, dim = q.shape
    group = q_heads // k.shape[1]
    offset = pattern.seq_k - seq_q
    mask = token_mask(pattern, batch, q_heads, causal) & pattern.token_rule.table[offset:, :]
    empty = ~mask.any(-1, keepdim=True)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    keys, values = (x.repeat_interleave(group, 1) for x in leaves[1:])
    scores = (leaves[0] @ keys.transpose(-1, -2)) * dim**-0.5
    # Empty rows take a harmless all-visible softmax whose output and LSE are then replaced.
    scores = scores.masked_fill(~(mask | empty), float("-inf"))
    out = torch.where(empty, 0.0, torch.softmax(scores, -1) @ values)
    lse = torch.where(empty[..., 0], float("-inf"), torch.logsumexp(scores, -1))
    finite_lse = torch.where(empty[..., 0], 0.0, lse)
    ((out * dout.double()).sum() + (finite_lse * dlse.double()).sum()).backward()
    return out.detach(), lse.detach(), [x.grad for x in leaves], empty[..., 0]


def _triton_run(q, k, v, pattern, causal, dout, dlse, backend="triton"):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the backend runs the rule: no fallback
        out, lse = sa.block_sparse_attention(*leaves, pattern, causal=causal, backend=backend, return_lse=True)
    torch.autograd.backward((out, lse), (dout, dlse))
    return out.detach(), lse.detach(), [x.grad for x in leaves]


# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k): batch 2, GQA 2, head_dim 64,
# odd lengths, Sq < Sk, blocks of 16, 32 and 64 (block_k 16 uses half of each mask word; block_q 64
# spans two interpreter tiles and block_k 32 two key sub-tiles, so block-relative offsets are exercised).
RANDOM_CASES = [
    ((2, 4, 2, 45, 45, 64, 16, 16), True, "kv"),
    ((2, 4, 2, 45, 45, 64, 16, 16), False, "query"),
    ((2, 4, 2, 70, 90, 64, 64, 16), True, "shared"),
    ((2, 4, 2, 50, 61, 64, 16, 32), False, "kv"),
]


@pytest.mark.parametrize(
    "shape, causal, heads_kind, backend",
    [(*case, "triton") for case in RANDOM_CASES] + [(*RANDOM_CASES[0], "reference"), (*RANDOM_CASES[1], "reference")],
    ids=str,
)
def test_random_token_rule_forward_and_gradients_match_the_oracle(shape, causal, heads_kind, backend, poison_outputs):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, *_ = shape
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    seed = seq_q + seq_k + heads
    pattern = _random_rule_pattern(shape, heads=heads, causal=causal, seed=seed)
    assert pattern.partial_entries() > 0
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=generator)
    dlse = torch.randn(q.shape[:3], generator=generator)
    want_out, want_lse, want_grads, empty = _rule_oracle(q, k, v, pattern, causal, dout, dlse)
    assert empty.any() and not empty.all()
    out, lse, grads = _triton_run(q, k, v, pattern, causal, dout, dlse, backend)
    assert relative_error(out, want_out) <= TOLERANCE[torch.float32]
    assert bool((out[empty] == 0).all())
    assert torch.equal(torch.isneginf(lse), empty)
    finite = ~empty
    assert relative_error(lse[finite], want_lse[finite]) <= TOLERANCE[torch.float32]
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        assert torch.isfinite(got).all(), f"d{name} has non-finite values"
        assert relative_error(got, want) <= TOLERANCE[torch.float32], f"d{name}"


def test_rule_lists_put_whole_entries_first_and_carry_the_bitmask_index():
    shape = (2, 4, 2, 50, 61, 64, 16, 32)
    pattern = _random_rule_pattern(shape, heads=2, causal=True, seed=11)
    plan = plan_for(pattern, causal=True)
    lists, bitmask = plan.rule_lists, rule_bitmask(pattern)
    used = torch.arange(pattern.max_kv) < pattern.kv_counts[..., None]
    for b in range(pattern.batch):
        for h in range(pattern.num_heads):
            for row in range(pattern.num_q_blocks):
                count = int(pattern.kv_counts[b, h, row])
                original = pattern.kv_indices[b, h, row, :count].tolist()
                entries = dict(zip(original, bitmask.entry_index[b, h, row, :count].tolist(), strict=True))
                reordered = lists.kv_indices[b, h, row, :count].tolist()
                full = int(lists.full_counts[b, h, row])
                assert sorted(reordered) == original
                assert reordered[:full] == sorted(reordered[:full]) and reordered[full:] == sorted(reordered[full:])
                assert lists.rule_index[b, h, row, :count].tolist() == [entries[x] for x in reordered]
                # Whole entries: causally full (their last key at or before the block's first query) and not cut.
                first_query = row * 16 + pattern.seq_k - pattern.seq_q
                for slot, block in enumerate(reordered):
                    whole = (block + 1) * 32 <= pattern.seq_k and (block + 1) * 32 - 1 <= first_query
                    assert (slot < full) == (whole and entries[block] < 0)
    assert bool(((bitmask.entry_index >= 0) == (pattern.rule_partial & used)).all())
    # The transposed lists carry each entry's index beside its query block.
    transposed = plan.transposed
    for b, h, kv_block in ((0, 0, 0), (1, 1, 1), (0, 1, 1)):
        for slot in range(int(transposed.q_counts[b, h, kv_block])):
            q_block = int(transposed.q_indices[b, h, kv_block, slot])
            position = (
                pattern.kv_indices[b, h, q_block, : int(pattern.kv_counts[b, h, q_block])].tolist().index(kv_block)
            )
            assert int(transposed.rule_index[b, h, kv_block, slot]) == int(bitmask.entry_index[b, h, q_block, position])


def test_bitmask_words_hold_the_rule_bit_by_bit():
    shape = (1, 2, 2, 45, 45, 64, 16, 16)
    pattern = _random_rule_pattern(shape, heads=1, causal=False, seed=5)
    bitmask = rule_bitmask(pattern)
    table = pattern.token_rule.table
    padded = torch.zeros(48, 48, dtype=torch.bool)
    padded[:45, :45] = table
    for row, slot in (pattern.rule_partial[0, 0] & (bitmask.entry_index[0, 0] >= 0)).nonzero().tolist():
        entry = int(bitmask.entry_index[0, 0, row, slot])
        block = int(pattern.kv_indices[0, 0, row, slot])
        words = bitmask.words[entry, :, 0].long() & 0xFFFFFFFF
        bits = (words[:, None] >> torch.arange(32)) & 1
        want = padded[row * 16 : row * 16 + 16, block * 16 : block * 16 + 16]
        # Positions past the sequence take the rule at the clamped position; only in-range bits matter.
        rows, keys = min(16, 45 - row * 16), min(16, 45 - block * 16)
        assert torch.equal(bits[:rows, :keys].bool(), want[:rows, :keys])
        assert not bits[:, 16:].any()  # block_k 16: the upper half of each word stays clear


# (method, options, dtype): neighborhood in 2D and 3D with dilation 2 and text tokens before / after,
# sliding_tile on tiles that do not fill its blocks; batch 2, GQA 2 (2 query heads, 1 KV head), head_dim 64.
SPATIAL_CASES = [
    ("neighborhood", dict(grid=(9, 11), window=(3, 5), dilation=(1, 2), tile=(4, 4), text_tokens=5,
                          text_position="before", block_q=16, block_k=16), torch.float32),
    ("neighborhood", dict(grid=(3, 6, 6), window=3, dilation=(1, 2, 2), tile=(1, 3, 4), text_tokens=3,
                          block_q=32, block_k=32), torch.float32),
    ("sliding_tile", dict(grid=(9, 10), tile=(4, 4), window=(3, 1), block_q=16, block_k=16), torch.float32),
    ("neighborhood", dict(grid=(7, 9), window=3, dilation=(1, 2), tile=(4, 4), text_tokens=5,
                          block_q=16, block_k=16), torch.bfloat16),
]  # fmt: skip


@pytest.mark.parametrize("method, options, dtype", SPATIAL_CASES, ids=str)
def test_spatial_rule_patterns_on_the_kernel_match_the_reference(method, options, dtype, poison_outputs):
    layout = sa.layouts.Layout(
        options["grid"],
        tile=options["tile"],
        text_tokens=options.get("text_tokens", 0),
        text_position=options.get("text_position", "after"),
    )
    q, k, v = random_qkv(2, 2, 1, layout.seq_len, layout.seq_len, 64, seed=len(options["grid"]))
    pattern = sa.estimate(q, k, method, causal=False, **options)
    assert pattern.partial_entries() > 0
    assert resolve_backend("triton", q, k, v, pattern, causal=False, return_lse=False) == "triton"
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for backend, run_dtype in (("reference", torch.float32), ("triton", dtype)):
        leaves = [x.detach().to(run_dtype).requires_grad_() for x in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback: each backend runs the rule itself
            out = sa.block_sparse_attention(*leaves, pattern, causal=False, backend=backend)
        out.backward(dout.to(run_dtype))
        results.append((out.detach(), [x.grad for x in leaves]))
    (want, want_grads), (got, grads) = results
    assert got.dtype == dtype and relative_error(got, want) <= TOLERANCE[dtype]
    for name, g, w in zip("qkv", grads, want_grads, strict=True):
        assert torch.isfinite(g).all() and relative_error(g, w) <= TOLERANCE[dtype], f"d{name}"


def test_bitmask_memory_is_that_of_the_partial_entries(monkeypatch):
    """At 32K tokens (S^2 = 1G pairs): the table holds block_q * block_k / 8 bytes per partial entry,
    the rule is evaluated on the partial entries only, each call within the chunk budget."""
    monkeypatch.setattr(plan_module, "_RULE_PAIRS_PER_CHUNK", 1 << 18)
    length, block = 1 << 15, 64
    q = torch.empty(1, 1, length, 64)
    options = dict(grid=(length,), window=9, dilation=2, tile=(block,), block_q=block, block_k=block)
    pattern = sa.estimate(q, q, "neighborhood", causal=False, **options)
    counting = CountingRule(pattern.token_rule)
    pattern = MaskedPattern.over_layout(pattern, pattern.layout, token_rule=counting, rule_partial=pattern.rule_partial)
    n_partial = pattern.partial_entries()
    assert 0 < n_partial < 4 * pattern.num_q_blocks
    bitmask = rule_bitmask(pattern)
    assert bitmask.words.shape == (n_partial, block, block // 32) and bitmask.words.dtype == torch.int32
    assert bitmask.words.numel() * 4 == n_partial * block * block // 8
    assert bitmask.entry_index.shape == pattern.kv_indices.shape
    assert sum(counting.pairs) == n_partial * block * block  # partial entries only
    assert max(counting.pairs) <= 1 << 18
    assert rule_bitmask(pattern) is bitmask  # cached on the pattern


class CountingRule:
    """Another rule, recording the broadcast size of every ``allowed`` call."""

    def __init__(self, rule) -> None:
        self.rule = rule
        self.pairs = []

    def to(self, device) -> CountingRule:
        return CountingRule(self.rule.to(device))

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        self.pairs.append(torch.broadcast_shapes(q_pos.shape, k_pos.shape).numel())
        return self.rule.allowed(q_pos, k_pos)


def test_routing_of_rule_patterns():
    grid, window, tile = (5, 9), (3, 3), (4, 4)
    q, k, v = random_qkv(1, 2, 1, 48, 48, 16, seed=4)
    options = dict(grid=grid, window=window, tile=tile, text_tokens=3)
    pattern = sa.estimate(q, k, "neighborhood", causal=False, block_q=16, block_k=16, **options)
    assert pattern.partial_entries() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert resolve_backend("triton", q, k, v, pattern, causal=False, return_lse=False) == "triton"
        assert resolve_backend("auto", q, k, v, pattern, causal=False, return_lse=False) == "reference"  # CPU
        assert resolve_backend("flex", q, k, v, pattern, causal=False, return_lse=False) == "flex"
        triton_out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="triton")
    for name in ("gluon", "flash4"):
        with pytest.warns(UserWarning, match="whole blocks.*using the triton backend") as caught:
            out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend=name)
        assert len([w for w in caught if w.category is UserWarning]) == 1 and torch.equal(out, triton_out)
    # Query blocks below 16 rows go to the token-granular kernels, which take no rule: reference, one warning.
    small = sa.estimate(q, k, "neighborhood", causal=False, block_q=8, block_k=16, **options)
    assert small.partial_entries() > 0
    with pytest.warns(UserWarning, match="block_q.*using the reference backend") as caught:
        assert resolve_backend("triton", q, k, v, small, causal=False, return_lse=False) == "reference"
    assert len([w for w in caught if w.category is UserWarning]) == 1
    expected = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference")
    assert relative_error(triton_out, expected) < 1e-5


def test_a_rule_that_cuts_no_entry_gives_the_whole_block_result(poison_outputs):
    shape = (2, 4, 2, 45, 45, 64, 16, 16)
    plain = shape_pattern(shape, heads=2, density=0.5, causal=True, seed=9)
    rule = TableRule(torch.ones(45, 45, dtype=torch.bool))
    fields = {
        name: getattr(plain, name) for name in ("kv_counts", "kv_indices", "block_q", "block_k", "seq_q", "seq_k")
    }
    masked = MaskedPattern(**fields, token_rule=rule, rule_partial=torch.zeros_like(plain.kv_indices, dtype=torch.bool))
    assert masked.partial_entries() == 0 and rule_bitmask(masked).words.shape[0] == 1
    q, k, v = random_qkv(*shape[:6], seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = sa.block_sparse_attention(q, k, v, masked, backend="triton")
    assert relative_error(got, sa.block_sparse_attention(q, k, v, plain, backend="triton")) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_neighborhood_3d_forward_and_backward_match_the_reference(dtype, poison_outputs):
    grid, window, tile = (8, 32, 32), (3, 7, 7), (2, 8, 8)
    layout = sa.layouts.Layout(grid, tile=tile)
    q, k, v = random_qkv(1, 8, 8, layout.seq_len, layout.seq_len, 128, dtype=dtype, device="cuda", seed=21)
    pattern = sa.estimate(q, k, "neighborhood", causal=False, grid=grid, window=window, tile=tile)
    assert pattern.partial_entries() > 0
    # auto takes the Gluon kernel for a rule it offers as a box predicate; triton by name runs the
    # predicate forward; both backward passes read the bitmasks.
    assert resolve_backend("auto", q, k, v, pattern, causal=False, return_lse=False) == "gluon"
    assert_backends_match_reference(q, k, v, pattern, ("auto", "triton"), dtype, causal=False)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_random_token_rule_matches_the_oracle(causal, poison_outputs):
    shape = (2, 8, 2, 300, 420, 128, 64, 64)
    pattern = _random_rule_pattern(shape, heads=2, causal=causal, seed=3).to("cuda")
    batch, q_heads, kv_heads, seq_q, seq_k, dim, *_ = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=3)
    dout, dlse = torch.randn(q.shape), torch.randn(q.shape[:3])
    cpu_pattern = pattern.to("cpu")
    want_out, want_lse, want_grads, empty = _rule_oracle(q, k, v, cpu_pattern, causal, dout, dlse)
    inputs = [x.to("cuda", torch.bfloat16) for x in (q, k, v)]
    out, lse, grads = _triton_run(*inputs, pattern, causal, dout.to("cuda", torch.bfloat16), dlse.to("cuda"))
    out, lse = out.cpu(), lse.cpu()
    assert relative_error(out, want_out) <= TOLERANCE[torch.bfloat16]
    assert bool((out[empty] == 0).all()) and torch.equal(torch.isneginf(lse), empty)
    for got, want in zip(grads, want_grads, strict=True):
        assert torch.isfinite(got).all() and relative_error(got.cpu(), want) <= TOLERANCE[torch.bfloat16]
