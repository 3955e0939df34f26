"""The token-granular Triton kernels (``block_q < 16`` on the ``triton`` backend) against float64 oracles.

Forward (output and log-sum-exp) and gradients against ``helpers.naive_attention`` (dense masked
softmax in float64), on CPU under the interpreter at small shapes: block_q 1, 2, 8; block_k 16,
32, 64 and a non-power of two; GQA 1-8 with 12/4 and 6/3 heads; lists per query head, per KV
head and shared; odd lengths, Sq < Sk, batch > 1 and a pattern broadcast over the batch;
causal and not; fp32 and bf16. Outputs and gradients come from a NaN-poisoned allocator.
GPU tests (``-m gpu``) run the kernels at real sizes (to 128K) and compare sampled rows (and
the gradients of a loss on them) and, at a shorter length, every row with ``helpers.row_attention``,
an exact float32 oracle of chosen rows, itself checked here against the float64 one.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from helpers import (
    TOLERANCE,
    expected_nonfinite,
    naive_attention,
    random_qkv,
    relative_error,
    row_attention,
    sample_rows,
    shape_pattern,
    source_in_child,
)

import sparse_attn as sa
from sparse_attn.backends import _backend_module, triton_tokens
from sparse_attn.backends.configs import kernel_configs

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k)
SHAPES = [
    (1, 4, 2, 21, 21, 16, 1, 16),
    (2, 6, 3, 23, 37, 32, 2, 16),
    (1, 8, 1, 13, 29, 16, 1, 32),
    (2, 12, 4, 9, 33, 16, 1, 7),
    (1, 3, 3, 27, 40, 64, 8, 16),
    (2, 8, 8, 10, 70, 16, 1, 64),
]
HEAD_KINDS = ("query", "kv", "shared")


def _oracle(q, k, v, pattern, causal, dout, dlse):
    """Float64 output, LSE and gradients of ``sum(out * dout) + sum(lse * dlse)``."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = naive_attention(*leaves, pattern, causal)
    ((out * dout.double()).sum() + (lse * dlse.double()).sum()).backward()
    return out.detach(), lse.detach(), [x.grad for x in leaves]


def _triton(q, k, v, pattern, causal, dout, dlse):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the triton backend runs it: no fallback warning
        out, lse = sa.block_sparse_attention(*leaves, pattern, causal=causal, backend="triton", return_lse=True)
    torch.autograd.backward((out, lse), (dout, dlse))
    return out.detach(), lse.detach(), [x.grad for x in leaves]


def _check(shape, causal, heads_kind, seed, dtype=torch.float32, pattern_batch=None, density=0.4):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, *_ = shape
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    pattern_shape = (pattern_batch or batch, *shape[1:])
    pattern = shape_pattern(pattern_shape, heads=heads, density=density, causal=causal, seed=seed)
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=generator).to(dtype)
    dlse = torch.randn(q.shape[:3], generator=generator)
    want_out, want_lse, want_grads = _oracle(q, k, v, pattern, causal, dout, dlse)
    out, lse, grads = _triton(q, k, v, pattern, causal, dout, dlse)
    tolerance = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, want_out) <= tolerance, "out"
    assert relative_error(lse, want_lse) <= tolerance, "lse"
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        assert got.dtype == dtype and torch.isfinite(got).all(), f"d{name} not finite"
        assert relative_error(got, want) <= tolerance, f"d{name}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_forward_and_gradients_match_float64_oracle(shape, causal, poison_outputs):
    # One head kind per case (rotating with the shape) keeps the interpreter time down while
    # every kind meets causal and non-causal cases and several block sizes.
    heads_kind = HEAD_KINDS[(SHAPES.index(shape) + causal) % 3]
    _check(shape, causal, heads_kind, seed=SHAPES.index(shape))


# Tiles of exactly one query block (heads x block_q fill the 16 rows: NSA's group of 16 for one
# token, a group of 2 with 8-token blocks, of 4 with 4-token blocks, of 8 with 2-token blocks):
# the forward and dQ kernels read the pattern's own padded lists instead of union lists.
ONE_BLOCK_TILES = [
    ((1, 16, 1, 19, 45, 16, 1, 16), True, "kv"),
    ((2, 32, 2, 23, 40, 16, 1, 32), False, "shared"),
    ((2, 4, 2, 37, 50, 16, 8, 32), True, "kv"),
    ((1, 8, 2, 29, 64, 32, 4, 16), True, "kv"),
    ((1, 8, 1, 33, 33, 16, 2, 7), False, "shared"),
]


@pytest.mark.parametrize("shape, causal, heads_kind", ONE_BLOCK_TILES, ids=str)
def test_one_block_tiles_read_the_patterns_own_lists(shape, causal, heads_kind, poison_outputs):
    batch, q_heads, kv_heads, *_, block_q, _ = shape
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    assert block_q < 16 and triton_tokens.token_tiling(q_heads, kv_heads, heads, block_q).tile_blocks == 1
    _check(shape, causal, heads_kind, seed=40 + ONE_BLOCK_TILES.index((shape, causal, heads_kind)))


# Blocks of >= 256 keys take the gathered (key-centric) path: per block, the rows that list it.
GATHERED_SHAPES = [
    ((1, 4, 2, 90, 300, 16, 1, 256), True, "kv"),
    ((2, 6, 3, 30, 280, 16, 2, 260), False, "query"),
    ((1, 8, 2, 64, 300, 32, 1, 256), True, "shared"),
]


@pytest.mark.parametrize("shape, causal, heads_kind", GATHERED_SHAPES, ids=str)
def test_gathered_path_matches_float64_oracle(shape, causal, heads_kind, poison_outputs):
    _check(shape, causal, heads_kind, seed=20 + GATHERED_SHAPES.index((shape, causal, heads_kind)))


@pytest.mark.parametrize("shape, causal, heads_kind", [GATHERED_SHAPES[0], GATHERED_SHAPES[1]], ids=str)
def test_gathered_path_with_128_rows_per_program(shape, causal, heads_kind, poison_outputs):
    """``kernel_configs(token_gather_rows=128)``: twice the gathered rows per program (half the work
    items, each block's keys loaded once per 128 listing rows), the same float64-oracle results,
    forward and gradients (the backward's dQ takes the same rows)."""
    from sparse_attn.backends import triton_tokens_gathered as gathered

    built = []
    original = gathered.gathered_work
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gathered, "gathered_work", lambda *a, **kw: built.append(a[-1]) or original(*a, **kw))
        with kernel_configs(token_gather_rows=128):
            _check(shape, causal, heads_kind, seed=70 + GATHERED_SHAPES.index((shape, causal, heads_kind)))
    batch, q_heads, kv_heads, *_, block_q, _ = shape
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    tiling = triton_tokens.token_tiling(q_heads, kv_heads, heads, block_q)
    assert built and set(built) == {128 // (tiling.heads * block_q)}  # entries per item, forward and dQ
    with pytest.raises(ValueError, match="token_gather_rows must be one of"):
        with kernel_configs(token_gather_rows=32):
            pass


@pytest.mark.parametrize("shape, causal, heads_kind", [GATHERED_SHAPES[0], GATHERED_SHAPES[1]], ids=str)
def test_gathered_forward_through_tensor_descriptors(shape, causal, heads_kind, poison_outputs):
    """``kernel_configs(triton_loads=["tma"])``: the gathered forward reads K and V through tensor
    descriptors (on Hopper the autotuner tries both load kinds); the same float64-oracle results,
    block ends that are not a multiple of the key step included (260-key blocks), and NaN in V
    past a block's end reaching no row that does not list that block."""
    from sparse_attn.backends import triton_tokens_gathered as gathered

    used = []
    original = gathered._launch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gathered, "_launch", lambda kind, *a: used.append((kind, a[-1])) or original(kind, *a))
        with kernel_configs(triton_loads=["tma"]):
            _check(shape, causal, heads_kind, seed=80 + GATHERED_SHAPES.index((shape, causal, heads_kind)))
    assert ("forward", (True,)) in used
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    pattern = shape_pattern(shape, heads=heads, density=0.4, causal=causal, seed=3)
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=4)
    v[:, :, block_k] = float("nan")  # the first key of the second block
    with kernel_configs(triton_loads=["tma"]):
        got = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="triton")
    want = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend="reference")
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert relative_error(got[finite], want[finite]) <= TOLERANCE[torch.float32]


# (q_heads, kv_heads, pattern heads, block_q, block_k) -> the gathered path by default?
PATH_RULE = [
    ((32, 8, 32, 1, 64), True),  # MoBA's lists per query head, 64-key blocks (measured: gathered 8x faster)
    ((32, 8, 32, 1, 128), True),
    ((32, 8, 32, 1, 32), False),  # smaller blocks: not measured, the tile path
    ((32, 8, 32, 2, 64), False),  # two-token query blocks: not measured
    ((8, 8, 8, 1, 64), True),  # a group of one: no head shares a tile either
    ((64, 4, 4, 1, 64), False),  # NSA: the 16 heads of a group share each list (one tile)
    ((32, 8, 8, 1, 64), False),  # MoBA's share_in_group: 4 heads per tile
    ((32, 8, 8, 1, 512), True),  # large blocks: always
    ((32, 8, 32, 4, 4096), True),
]


@pytest.mark.parametrize("heads, gathered_by_default", PATH_RULE, ids=str)
def test_path_rule_and_forced_paths(heads, gathered_by_default):
    """Which token path a pattern takes (triton_tokens_gathered.uses_gathered_path), and
    ``kernel_configs(token_path=...)`` forcing either; a bad value is refused."""
    from sparse_attn.backends import triton_tokens_gathered as gathered

    q_heads, kv_heads, pattern_heads, block_q, block_k = heads
    seq = 4 * block_k
    pattern = shape_pattern((1, pattern_heads, 1, seq, seq, 16, block_q, block_k), heads=pattern_heads, density=0.5,
                            causal=True, seed=1)  # fmt: skip
    assert gathered.uses_gathered_path(pattern, q_heads, kv_heads) is gathered_by_default
    for path in ("tile", "gathered"):
        with kernel_configs(token_path=path):
            assert gathered.uses_gathered_path(pattern, q_heads, kv_heads) is (path == "gathered")
    with pytest.raises(ValueError, match="token_path must be one of"):
        with kernel_configs(token_path="tiles"):
            pass


@pytest.mark.parametrize("path", ["tile", "gathered"])
@pytest.mark.parametrize(
    "shape, causal, heads_kind",
    [((2, 8, 8, 10, 70, 16, 1, 64), True, "query"), ((1, 4, 2, 41, 50, 16, 1, 64), False, "query")],
    ids=str,
)
def test_both_paths_of_per_head_lists_match_float64_oracle(path, shape, causal, heads_kind, poison_outputs):
    """One-token lists per query head with 64-key blocks (the gathered path's by default): both
    paths, forced, against the float64 oracle, forward and gradients."""
    with kernel_configs(token_path=path):
        _check(shape, causal, heads_kind, seed=90 + shape[3])


@pytest.mark.parametrize(
    "batch, q_heads, heads_kind, entries", [(2, 6, "query", 4), (1, 8, "kv", 2), (3, 4, "shared", 8)]
)
def test_gathered_work_items_cover_each_list_once(batch, q_heads, heads_kind, entries):
    """The gathered work items against a plain construction: per (sequence, head chunk, KV block)
    in order, items of ``entries`` transposed entries each from the list's start, then the spare
    items (``combo`` -1); the slots are each entry's place in its query block's list."""
    from sparse_attn.backends import triton_tokens_gathered as gathered

    kv_heads, seq, block_k = 2, 45, 8
    pattern_heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    pattern = shape_pattern((1, q_heads, kv_heads, seq, seq, 16, 1, block_k), heads=pattern_heads, density=0.5,
                            causal=True, seed=batch)  # fmt: skip
    heads = q_heads // max(pattern_heads, kv_heads) if heads_kind != "query" else 1
    work = gathered.gathered_work(pattern, batch, q_heads, heads, entries)
    lists = triton_tokens.token_lists(pattern, 1)
    n_kv, chunks = pattern.num_kv_blocks, q_heads // heads
    want_combos, want_starts = [], []
    for combo in range(batch * chunks * n_kv):
        pattern_head = (combo // n_kv) % chunks * heads // (q_heads // pattern_heads)
        row = pattern_head * n_kv + combo % n_kv
        first, end = int(lists.t_offsets[row]), int(lists.t_offsets[row + 1])
        for start in range(first, end, entries):
            want_combos.append(combo)
            want_starts.append(start)
    n = len(want_combos)
    assert work.combos[:n].tolist() == want_combos and work.starts[:n].tolist() == want_starts
    assert (work.combos[n:] == -1).all()
    for row in range(pattern_heads * n_kv):
        for entry in range(int(lists.t_offsets[row]), int(lists.t_offsets[row + 1])):
            q_block, slot = int(lists.t_tiles[entry]), int(work.slots[entry])
            assert int(pattern.kv_indices[0, row // n_kv, q_block, slot]) == row % n_kv


def test_gathered_partials_are_packed_by_list_length(poison_outputs):
    """The gathered path keeps one partial per listed (query row, KV block) pair, packed row after
    row (not ``rows x max_kv``): offsets against a brute-force running sum over uneven lists, a
    pattern broadcast over the batch among them; the buffers the forward allocates hold exactly
    ``total`` rows; and the outputs and gradients still match the float64 oracle."""
    from sparse_attn.backends import triton_tokens_gathered as gathered

    batch, q_heads, seq_q, seq_k, block_k = 2, 6, 30, 600, 256
    counts = torch.tensor([[[1, 3, 2, 3, 1] * 6, [2, 1, 1, 3, 2] * 6, [3, 3, 3, 1, 1] * 6]], dtype=torch.int32)
    indices = torch.zeros(1, 3, seq_q, 3, dtype=torch.int32)
    for head in range(3):
        for token in range(seq_q):
            n = int(counts[0, head, token])
            indices[0, head, token, :n] = torch.arange(n)
    pattern = sa.BlockSparsePattern(counts, indices, block_q=1, block_k=block_k, seq_q=seq_q, seq_k=seq_k)
    offsets = gathered.partial_offsets(pattern, batch, q_heads)
    per_row = [
        int(counts[0, head // 2, token]) for _ in range(batch) for head in range(q_heads) for token in range(seq_q)
    ]
    want = torch.tensor([0, *per_row]).cumsum(0)
    assert torch.equal(offsets.offsets, want) and offsets.total == sum(per_row) < batch * q_heads * seq_q * 3
    assert gathered.partial_offsets(pattern, batch, q_heads) is offsets  # built once per pattern

    q, k, v = random_qkv(batch, q_heads, 3, seq_q, seq_k, 16, seed=61)
    allocated = []
    real_empty = torch.empty

    def recording_empty(*size, **keywords):
        allocated.append(tuple(size[0]) if len(size) == 1 and isinstance(size[0], tuple) else size)
        return real_empty(*size, **keywords)

    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(62))
    dlse = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(63))
    want_out, want_lse, want_grads = _oracle(q, k, v, pattern, False, dout, dlse)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gathered.torch, "empty", recording_empty)
        out, lse, grads = _triton(q, k, v, pattern, False, dout, dlse)
    assert (offsets.total, 16) in allocated and (offsets.total,) in allocated
    assert not any(len(size) == 5 for size in allocated)
    assert relative_error(out, want_out) <= 1e-4 and relative_error(lse, want_lse) <= 1e-4
    for got, want_grad in zip(grads, want_grads, strict=True):
        assert relative_error(got, want_grad) <= 1e-4


@pytest.mark.parametrize(
    "shape, heads_kind", [((2, 8, 2, 40, 40, 16, 1, 16), "kv"), ((1, 4, 2, 60, 300, 16, 1, 256), "query")], ids=str
)
def test_dkdv_split_over_long_lists(shape, heads_kind, monkeypatch, poison_outputs):
    """Long transposed lists cut into several dK/dV work items, summed afterwards (tile and
    gathered paths): segments of 4 entries make every list long."""
    from sparse_attn.backends import triton_tokens_backward

    monkeypatch.setattr(triton_tokens_backward, "MIN_SEGMENT", 4)
    monkeypatch.setattr(triton_tokens_backward, "SEGMENT_FACTOR", 0)
    built = []
    original = triton_tokens_backward.dkdv_work
    monkeypatch.setattr(
        triton_tokens_backward, "dkdv_work", lambda *a, **kw: built.append(original(*a, **kw)) or built[-1]
    )
    _check(shape, True, heads_kind, seed=30, density=0.8)
    assert built and built[0].partials > 0 and (built[0].sum_combos >= 0).any()


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], ONE_BLOCK_TILES[0][0]], ids=str)
def test_causal_dkdv_without_the_early_skip(shape, monkeypatch, poison_outputs):
    """Causal dK/dV with listing steps that end before the keys run fully masked instead of
    skipped by a branch (``DKDV_SKIP_EARLY = False``): the same gradients (Sq < Sk among them)."""
    from sparse_attn.backends import triton_tokens_backward

    monkeypatch.setattr(triton_tokens_backward, "DKDV_SKIP_EARLY", False)
    _check(shape, True, "kv", seed=50)


def test_pattern_broadcast_over_the_batch(poison_outputs):
    _check((3, 4, 2, 17, 25, 16, 1, 16), True, "kv", seed=11, pattern_batch=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_k", [16, 256])
def test_half_precision(dtype, block_k, poison_outputs):
    _check((1, 8, 2, 19, 2 * block_k + 44, 32, 1, block_k), True, "kv", seed=12, dtype=dtype)


@pytest.mark.parametrize(
    "tile_blocks, batch, heads, seq_q, seq_k, density, block_q, block_k, seed",
    [
        (3, 2, 3, 23, 50, 0.5, 2, 8, 3),
        (1, 2, 3, 23, 50, 0.5, 2, 8, 3),  # 1: the one-block path (the pattern's lists, one sort)
        (4, 1, 4, 37, 37, 0.3, 1, 4, 5),
        (2, 3, 1, 16, 64, 0.9, 4, 16, 6),  # Sq < Sk, nearly full lists
        (5, 1, 2, 9, 200, 0.05, 1, 16, 7),  # short lists, some empty
        (1, 1, 5, 30, 30, 0.2, 3, 5, 8),
    ],
)
def test_token_lists_are_tile_unions_with_row_bits(
    tile_blocks, batch, heads, seq_q, seq_k, density, block_q, block_k, seed
):
    """Against a brute-force union per tile and a brute-force transpose (the arrays are built at
    the padded lists' size: only the entries the offsets bound are compared)."""
    pattern = sa.random_pattern(
        batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k, density=density, block_q=block_q, block_k=block_k,
        seed=seed, causal=False,
    )  # fmt: skip
    lists = triton_tokens.token_lists(pattern, tile_blocks)
    mask = pattern.to_mask()  # (B, H, n_q, n_kv)
    n_q, n_kv = pattern.num_q_blocks, pattern.num_kv_blocks
    n_tiles = -(-n_q // tile_blocks)
    transposed = {}
    assert lists.offsets.numel() == batch * heads * n_tiles + 1
    assert lists.t_offsets.numel() == batch * heads * n_kv + 1
    for b in range(batch):
        for h in range(heads):
            for tile in range(n_tiles):
                row = (b * heads + h) * n_tiles + tile
                start, end = lists.offsets[row].item(), lists.offsets[row + 1].item()
                blocks = mask[b, h, tile * tile_blocks : (tile + 1) * tile_blocks]  # (<= tile_blocks, n_kv)
                expected = [j for j in range(n_kv) if blocks[:, j].any()]
                assert lists.blocks[start:end].tolist() == expected
                for j, bits in zip(expected, lists.bits[start:end].tolist(), strict=True):
                    assert bits == sum(1 << i for i in range(blocks.shape[0]) if blocks[i, j])
                    transposed.setdefault((b, h, j), []).append((tile, bits))
            for j in range(n_kv):
                row = (b * heads + h) * n_kv + j
                start, end = lists.t_offsets[row].item(), lists.t_offsets[row + 1].item()
                entries = list(zip(lists.t_tiles[start:end].tolist(), lists.t_bits[start:end].tolist(), strict=True))
                assert entries == transposed.get((b, h, j), [])
    assert lists.offsets[-1] == lists.t_offsets[-1] == sum(len(x) for x in transposed.values())
    assert lists.ready is None and triton_tokens.wait_for_lists(lists) is lists  # (an event on CUDA only)
    assert triton_tokens.token_lists(pattern, tile_blocks) is lists  # built once per pattern


@pytest.mark.parametrize(
    "batch, pattern_batch, q_heads, kv_heads, pattern_heads, heads, seq, density, min_segment, factor, seed",
    [
        (1, 1, 8, 2, 2, 4, 40, 0.6, 4, 0, 1),  # every list longer than a segment: all blocks split
        (2, 2, 8, 2, 2, 2, 40, 0.6, 8, 0, 2),  # two head sets per group
        (3, 1, 6, 3, 6, 1, 33, 0.4, 4, 1, 3),  # lists per query head, one pattern for the batch
        (2, 1, 4, 4, 1, 1, 50, 0.5, 16, 0, 4),  # shared lists (one pattern head, four KV heads)
        (1, 1, 16, 1, 1, 16, 64, 0.3, 256, 4, 5),  # the defaults: nothing split at this size
    ],
)
def test_dkdv_work_items_against_brute_force(
    batch, pattern_batch, q_heads, kv_heads, pattern_heads, heads, seq, density, min_segment, factor, seed, monkeypatch
):
    """The padded work arrays (:func:`dkdv_work`) hold, before their spare items (combo -1), the
    items a plain loop over the transposed lists makes: per block one item, or per head set
    segments of its list where the block's lists are longer than a segment; partial slots in item
    order, and per split block its first slot and item count."""
    from sparse_attn.backends import triton_tokens_backward as tb

    monkeypatch.setattr(tb, "MIN_SEGMENT", min_segment)
    monkeypatch.setattr(tb, "SEGMENT_FACTOR", factor)
    pattern = sa.random_pattern(
        batch=pattern_batch, heads=pattern_heads, seq_q=seq, density=density, block_q=1, block_k=4, seed=seed
    )
    lists = triton_tokens.token_lists(pattern, 1)
    entries = 2
    work = tb.dkdv_work(
        pattern, lists.t_offsets, batch=batch, q_heads=q_heads, kv_heads=kv_heads, heads=heads, entries=entries
    )
    t_offsets, n_kv, chunks = lists.t_offsets.tolist(), pattern.num_kv_blocks, q_heads // kv_heads // heads
    mean = pattern.kv_indices.numel() / (len(t_offsets) - 1)
    segment = -(-max(min_segment, int(factor * mean)) // entries) * entries
    items, sums, parts = [], [], 0
    for combo in range(batch * kv_heads * n_kv):
        b, kv_head, block = combo // n_kv // kv_heads, combo // n_kv % kv_heads, combo % n_kv
        spans = []
        for chunk in range(chunks):
            first_head = (kv_head * chunks + chunk) * heads
            row = ((b if pattern_batch > 1 else 0) * pattern_heads + first_head // (q_heads // pattern_heads)) * n_kv
            spans.append((t_offsets[row + block], t_offsets[row + block + 1]))
        if sum(end - start for start, end in spans) <= segment:
            items.append((combo, -1, 0, t_offsets[-1], -1))
            continue
        sums.append((combo, parts, 0))
        for chunk, (start, end) in enumerate(spans):
            for at in range(start, end, segment):
                items.append((combo, chunk, at, min(at + segment, end), parts))
                parts += 1
        sums[-1] = (combo, sums[-1][1], parts - sums[-1][1])
    got = list(zip(*(x.tolist() for x in (work.combo, work.chunk, work.start, work.end, work.partial)), strict=True))
    assert got[: len(items)] == items
    assert all(item[0] == -1 for item in got[len(items) :])
    got_sums = list(zip(*(x.tolist() for x in (work.sum_combos, work.sum_first, work.sum_counts)), strict=True))
    assert got_sums[: len(sums)] == sums and all(s[0] == -1 for s in got_sums[len(sums) :])
    assert work.partials == parts
    if factor == 0:
        assert parts > 0  # the case splits blocks


@pytest.mark.parametrize(
    "heads, block_q, expected",
    [
        ((64, 4, 4), 1, (16, 1, 1, 16)),  # NSA: the group's 16 heads of one token
        ((64, 4, 64), 1, (1, 16, 16, 16)),  # lists per query head (moba): 16 tokens of one head
        ((12, 4, 4), 1, (3, 5, 5, 16)),  # 3 heads x 5 tokens, padded to 16 rows
        ((12, 4, 1), 2, (3, 2, 4, 16)),  # shared lists: the group packs as for per-KV-head lists
        ((48, 1, 1), 8, (8, 1, 8, 64)),  # a group of 48 with 8-token blocks: 8 heads (<= 64 rows)
        ((4, 4, 4), 8, (1, 2, 16, 16)),  # no GQA
    ],
)
def test_token_tiling(heads, block_q, expected):
    tiling = triton_tokens.token_tiling(*heads, block_q)
    assert (tiling.heads, tiling.tile_blocks, tiling.tile_tokens, tiling.block_m) == expected


@pytest.mark.parametrize(
    "rows, heads, block_q, expected",
    [
        (64, (64, 4, 4), 1, (16, 4, 4, 64)),  # NSA's group of 16 x 4 tokens
        (128, (64, 4, 4), 1, (16, 8, 8, 128)),
        (64, (64, 4, 64), 1, (1, 16, 16, 16)),  # per-head lists: at most 16 query blocks per tile
        (32, (12, 4, 1), 2, (3, 5, 10, 32)),
    ],
)
def test_token_rows_override_widens_the_tiles(rows, heads, block_q, expected):
    with kernel_configs(token_rows=rows):
        tiling = triton_tokens.token_tiling(*heads, block_q)
    assert (tiling.heads, tiling.tile_blocks, tiling.tile_tokens, tiling.block_m) == expected
    with pytest.raises(ValueError, match="token_rows"), kernel_configs(token_rows=48):
        pass


def _naive_union_ratio(pattern, tile_blocks):
    """union_ratio by Python sets: mean distinct blocks per tile over mean list length."""
    batch, heads, n_q, _ = pattern.kv_indices.shape
    lists = [
        [set(pattern.kv_indices[b, h, i, : pattern.kv_counts[b, h, i]].tolist()) for i in range(n_q)]
        for b in range(batch)
        for h in range(heads)
    ]
    n_tiles = -(-n_q // tile_blocks)
    unions = sum(
        len(set().union(*rows[t * tile_blocks : (t + 1) * tile_blocks])) for rows in lists for t in range(n_tiles)
    )
    listed = sum(len(row) for rows in lists for row in rows)
    return (unions / (len(lists) * n_tiles)) / (listed / (len(lists) * n_q))


@pytest.mark.parametrize("seq, block_q, tile_blocks", [(37, 1, 4), (64, 1, 4), (45, 2, 3), (50, 4, 16)])
@pytest.mark.parametrize("density", [0.2, 0.6])
def test_union_ratio_matches_sets(seq, block_q, tile_blocks, density):
    """Ragged last tiles, lists of varying length (causal), batch 2 x 3 heads."""
    pattern = shape_pattern((2, 6, 3, seq, seq, 16, block_q, 4), heads=3, density=density, causal=True, seed=seq)
    assert triton_tokens.union_ratio(pattern, tile_blocks) == pytest.approx(
        _naive_union_ratio(pattern, tile_blocks), rel=1e-9
    )


@pytest.mark.parametrize("seq, tile_blocks, max_tiles", [(37, 4, 3), (64, 4, 5), (45, 3, 1), (50, 16, 2)])
def test_union_ratio_sampled_tiles(seq, tile_blocks, max_tiles):
    """max_tiles: the ratio over that many full tiles spread evenly (the same for every batch and
    head), by sets over those tiles' query blocks; the exact ratio where the pattern has no more."""
    pattern = shape_pattern((2, 6, 3, seq, seq, 16, 1, 4), heads=3, density=0.4, causal=True, seed=seq)
    picks = torch.linspace(0, seq // tile_blocks - 1, max_tiles).long()
    rows = (picks[:, None] * tile_blocks + torch.arange(tile_blocks)).flatten()
    sampled = sa.BlockSparsePattern(
        pattern.kv_counts[:, :, rows].contiguous(),
        pattern.kv_indices[:, :, rows].contiguous(),
        block_q=1,
        block_k=pattern.block_k,
        seq_q=rows.numel(),
        seq_k=seq,
    )
    assert len(set(picks.tolist())) == max_tiles
    assert triton_tokens.union_ratio(pattern, tile_blocks, max_tiles) == pytest.approx(
        _naive_union_ratio(sampled, tile_blocks), rel=1e-9
    )
    n_tiles = -(-seq // tile_blocks)
    assert triton_tokens.union_ratio(pattern, tile_blocks, n_tiles) == triton_tokens.union_ratio(pattern, tile_blocks)
    with pytest.raises(ValueError, match="max_tiles"):
        triton_tokens.union_ratio(pattern, tile_blocks, 0)


def test_union_ratio_bounds():
    """Neighbours listing the same blocks give 1; listing disjoint ones gives the tile's size."""
    seq, tile = 32, 4
    same = torch.arange(3).expand(1, 1, seq, 3).contiguous()
    disjoint = (torch.arange(seq)[:, None] * 3 + torch.arange(3)).view(1, 1, seq, 3)
    for indices, want in ((same, 1.0), (disjoint, float(tile))):
        counts = torch.full((1, 1, seq), 3, dtype=torch.int32)
        pattern = sa.BlockSparsePattern(counts, indices.int(), block_q=1, block_k=1, seq_q=seq, seq_k=3 * seq)
        assert triton_tokens.union_ratio(pattern, tile) == pytest.approx(want)


def test_overlap_rows_choose_by_the_lists(monkeypatch):
    """token_rows="overlap": four-token tiles for NSA's group of 16 where the lists overlap, one
    token where they do not, the smallest tile where that already holds several query blocks;
    the choice is cached on the pattern, and the wide tiles take "zeroed_v" unless asked."""
    seq = 64
    own = torch.arange(seq) // 8
    shared = torch.stack([torch.zeros_like(own), own], -1).view(1, 1, seq, 2)  # first block + own
    counts = torch.full((1, 1, seq), 2, dtype=torch.int32)
    overlapping = sa.BlockSparsePattern(counts, shared.int(), block_q=1, block_k=8, seq_q=seq, seq_k=seq)
    # Each token its own block and one of the others in turn: four neighbours list five blocks or more.
    other = (own + 1 + torch.arange(seq) % 7) % 8
    scattered_lists = torch.stack([own, other], -1).sort(-1).values.view(1, 1, seq, 2)
    scattered = sa.BlockSparsePattern(counts, scattered_lists.int(), block_q=1, block_k=8, seq_q=seq, seq_k=seq)
    ratios = [triton_tokens.union_ratio(p, 4) for p in (overlapping, scattered)]
    assert ratios[0] == pytest.approx(1.0) and ratios[1] > triton_tokens.OVERLAP_LIMIT
    with kernel_configs(token_rows="overlap"):
        assert triton_tokens.token_tiling(64, 4, 1, 1, overlapping).tile_blocks == 4  # 16 heads x 4 tokens
        assert triton_tokens.token_tiling(64, 4, 1, 1, scattered).tile_blocks == 1
        assert triton_tokens.token_tiling(64, 4, 1, 1).tile_blocks == 1  # no pattern: the smallest tile
        assert triton_tokens.token_tiling(4, 4, 4, 1, overlapping).tile_blocks == 16  # per-head lists
        assert triton_tokens.wide_steps() == "zeroed_v"
        with kernel_configs(token_wide_steps="masked"):
            assert triton_tokens.wide_steps() == "masked"
        monkeypatch.setattr(triton_tokens, "_union_counts", lambda *args: pytest.fail("not cached"))
        assert triton_tokens.token_tiling(64, 4, 1, 1, overlapping).tile_blocks == 4
    assert triton_tokens.wide_steps() == triton_tokens.WIDE_STEPS_BY_DEFAULT
    with pytest.raises(ValueError, match="token_rows"), kernel_configs(token_rows="wide"):
        pass


def test_overlap_rows_measure_a_sample_of_tiles(monkeypatch):
    """token_rows="overlap" measures the ratio on at most OVERLAP_SAMPLE_TILES tiles."""
    calls = []
    monkeypatch.setattr(triton_tokens, "_union_counts", lambda *args: calls.append(args) or (None, 1, 1))
    seq = 64
    counts = torch.full((1, 1, seq), 1, dtype=torch.int32)
    lists = (torch.arange(seq) // 8).view(1, 1, seq, 1).int()
    pattern = sa.BlockSparsePattern(counts, lists, block_q=1, block_k=8, seq_q=seq, seq_k=seq)
    with kernel_configs(token_rows="overlap"):
        assert triton_tokens.token_tiling(64, 4, 1, 1, pattern).tile_blocks == 4
    assert [args[1:] for args in calls] == [(4, triton_tokens.OVERLAP_SAMPLE_TILES)]


@pytest.mark.parametrize("lists, tile_blocks", [("overlapping", 4), ("scattered", 1)])
def test_plan_ahead_starts_the_overlap_choice(lists, tile_blocks, monkeypatch):
    """``plan_ahead`` queues the union counts of token_rows="overlap" (read later, behind an event
    on CUDA); the tiling then takes its choice from them, the same as without it, measuring
    nothing more. Nothing is queued under other token_rows, for lists per query head (the
    smallest tile already holds 16 query blocks) or once the choice is known."""
    seq = 64
    own = torch.arange(seq) // 8
    other = {"overlapping": torch.zeros_like(own), "scattered": (own + 1 + torch.arange(seq) % 7) % 8}[lists]
    indices = torch.stack([own, other], -1).sort(-1).values.view(1, 1, seq, 2).int()
    counts = torch.full((1, 1, seq), 2, dtype=torch.int32)

    def pattern():
        return sa.BlockSparsePattern(counts, indices, block_q=1, block_k=8, seq_q=seq, seq_k=seq)

    q, k = torch.zeros(1, 64, seq, 8), torch.zeros(1, 4, seq, 8)
    idle, per_head, ahead, plain = pattern(), pattern(), pattern(), pattern()
    triton_tokens.plan_ahead(q, k, idle)  # token_rows not "overlap": nothing to start
    with kernel_configs(token_rows="overlap"):
        triton_tokens.plan_ahead(torch.zeros(1, 4, seq, 8), k, per_head)
        triton_tokens.plan_ahead(q, k, ahead)
        assert ahead.cached_plan(("overlap_counts", 16)) is not None
        assert ahead.cached_plan(("overlap_tile_blocks", 16)) is None
        expected = triton_tokens.token_tiling(64, 4, 1, 1, plain).tile_blocks
        monkeypatch.setattr(triton_tokens, "_union_counts", lambda *args: pytest.fail("measured again"))
        assert triton_tokens.token_tiling(64, 4, 1, 1, ahead).tile_blocks == expected == tile_blocks
        triton_tokens.plan_ahead(q, k, ahead)  # known: nothing queued
    assert all(not p._cache for p in (idle, per_head))


@pytest.mark.parametrize("limit, tile_blocks", [(0.5, 1), (100.0, 4)])
@pytest.mark.parametrize("case", ONE_BLOCK_TILES[:1] + ONE_BLOCK_TILES[3:4], ids=str)
def test_overlap_rows_match_float64_oracle(case, limit, tile_blocks, monkeypatch, poison_outputs):
    """token_rows="overlap" with the limit forced either way: the forward and both backward passes
    take the tiles chosen (recorded) and match the oracle."""
    shape, causal, heads_kind = case
    monkeypatch.setattr(triton_tokens, "OVERLAP_LIMIT", limit)
    taken = []
    tiling = triton_tokens.token_tiling

    def recorded(*args):
        taken.append(tiling(*args))
        return taken[-1]

    monkeypatch.setattr(triton_tokens, "token_tiling", recorded)
    from sparse_attn.backends import triton_tokens_backward

    monkeypatch.setattr(triton_tokens_backward, "token_tiling", recorded)
    monkeypatch.setattr(triton_tokens_backward, "DKDV_ONE_BLOCK_TILES", False)  # dK/dV on the chosen tiles too
    with kernel_configs(token_rows="overlap"):
        _check(shape, causal, heads_kind, seed=11)
    assert len(taken) >= 2 and {packing.tile_blocks for packing in taken} == {tile_blocks}


@pytest.mark.parametrize("wide_steps", ["branch", "masked", "zeroed_v"])
@pytest.mark.parametrize("shape, heads_kind", [(SHAPES[0], "kv"), (SHAPES[3], "shared"), (GATHERED_SHAPES[0][0], "kv")])
def test_wider_token_tiles_match_float64_oracle(shape, heads_kind, wide_steps, poison_outputs):
    """Tiles of several tokens per KV group (the union lists with per-token row bits), forward and
    gradients, in each of the forward's ways through such tiles."""
    with kernel_configs(token_rows=64, token_wide_steps=wide_steps):
        _check(shape, True, heads_kind, seed=7)


@pytest.mark.parametrize("one_block", [True, False], ids=["dkdv-one-block", "dkdv-forward-tiles"])
@pytest.mark.parametrize("shape, heads_kind", [(SHAPES[0], "kv"), (SHAPES[3], "shared")])
def test_dkdv_tiles_under_wide_forward_tiles(shape, heads_kind, one_block, monkeypatch, poison_outputs):
    """dK/dV on one-block tiles (DKDV_ONE_BLOCK_TILES, the default) or on the forward's wide tiles,
    under token_rows=64: gradients match the oracle either way, and the dK/dV lists are the tiles asked."""
    from sparse_attn.backends import triton_tokens_backward

    monkeypatch.setattr(triton_tokens_backward, "DKDV_ONE_BLOCK_TILES", one_block)
    monkeypatch.setattr(triton_tokens_backward, "DKDV_ONE_BLOCK_MIN_ROWS", 1)  # these small groups too
    plans = []
    real = triton_tokens_backward.dkdv_plan
    monkeypatch.setattr(triton_tokens_backward, "dkdv_plan", lambda *args: plans.append(real(*args)) or plans[-1])
    with kernel_configs(token_rows=64):
        _check(shape, True, heads_kind, seed=8)
    assert plans and all((plan[0].tile_blocks == 1) == one_block for plan in plans)


@pytest.mark.parametrize("heads, block_q, one_block", [((64, 4, 4), 1, True), ((64, 4, 64), 1, False),
                                                      ((12, 4, 1), 8, True), ((8, 4, 4), 2, False)])  # fmt: skip
def test_dkdv_one_block_tiles_where_a_block_fills_16_rows(heads, block_q, one_block):
    """By default dK/dV take one-block tiles where one query block's packed rows fill 16 rows (NSA's
    group of 16 heads of one token), and the forward's tiles otherwise (MoBA's per-head lists)."""
    from sparse_attn.backends import triton_tokens_backward

    q_heads, kv_heads, pattern_heads = heads
    seq = 64
    n_kv = seq // 16
    counts = torch.ones((1, pattern_heads, seq // block_q), dtype=torch.int32)
    indices = (torch.arange(seq // block_q) * block_q // 16).view(1, 1, -1, 1).expand(1, pattern_heads, -1, 1)
    pattern = sa.BlockSparsePattern(counts, indices.int().contiguous(), block_q=block_q, block_k=16, seq_q=seq,
                                    seq_k=seq)  # fmt: skip
    q = torch.empty((1, q_heads, seq, 16))
    k = torch.empty((1, kv_heads, seq, 16))
    assert n_kv == pattern.num_kv_blocks
    with kernel_configs(token_rows=64):
        tiling = triton_tokens_backward.dkdv_plan(q, k, pattern)[0]
        wide = triton_tokens.token_tiling(q_heads, kv_heads, pattern_heads, block_q, pattern)
    assert wide.tile_blocks > 1
    assert tiling.tile_blocks == (1 if one_block else wide.tile_blocks)


def test_rows_fit_int32():
    """int32 row offsets only where every offset within a batch entry (and heads x tokens) fits."""
    fits = triton_tokens.rows_fit_int32
    assert fits(torch.empty((2, 64, 131072, 128), device="meta"))  # 2^30 elements per batch entry
    assert not fits(torch.empty((1, 128, 131072, 128), device="meta"))  # 2^31
    assert fits(torch.empty((1, 8, 1, 128), device="meta").expand(3, 8, 2**20, 128))  # stride 0: no span
    wide_stride = torch.empty_strided((1, 2, 3, 64), (1, 2**31, 64, 1), device="meta")
    assert not fits(torch.empty((1, 2, 3, 64), device="meta"), wide_stride)
    assert not fits(torch.empty((1, 2**16, 2**15, 1), device="meta"))  # heads x tokens = 2^31 statistics


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("case", ONE_BLOCK_TILES[:1] + ONE_BLOCK_TILES[2:3], ids=str)
def test_dkdv_row_offsets_either_width_match_float64_oracle(case, narrow, monkeypatch, poison_outputs):
    """dK/dV's gathered rows by int32 or int64 offsets (forced), batch 1 and 2."""
    from sparse_attn.backends import triton_tokens_backward

    asked = []

    def forced(*tensors):
        asked.append(len(tensors))
        return narrow

    monkeypatch.setattr(triton_tokens_backward, "rows_fit_int32", forced)
    shape, causal, heads_kind = case
    _check(shape, causal, heads_kind, seed=5)
    assert asked


_SM90_TOKEN_FORWARD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from triton_sm90_compile import async_tile_copies, compile_for_sm90
from sparse_attn.backends.triton_tokens import _token_forward
pointers = {name: "*bf16" for name in ("Q", "K", "V", "Out")}
pointers.update({"Lse": "*fp32", "Offsets": "*i64", "Blocks": "*i32", "Bits": "*i32", "qk_scale": "fp32"})
pointers.update({"PoisonAny": "*i8", "PoisonCols": "*i8"})
results = {}
for mode in (0, 1, 2):  # branch, masked, zeroed_v
    for tokens in (1, 2, 4):  # NSA's 16-head group: 16, 32 and 64 rows
        constexprs = dict(HEAD_DIM=128, BLOCK_Q=1, BLOCK_K=64, HEADS=16, TILE_TOKENS=tokens, BLOCK_M=16 * tokens,
                          BLOCK_N=64, CAUSAL=True, WRITE_LSE=False, DOT_FP32=False, PRECISION="tf32",
                          WIDE_STEPS=mode)
        ttgir = []
        returncode, report, ptx = compile_for_sm90(_token_forward, pointers, constexprs, 4, ttgir=ttgir)
        results[f"{mode} {tokens}"] = [returncode, report, async_tile_copies(ttgir[0], 128), "wgmma" in ptx]
print(json.dumps(results))
"""


def test_token_forward_compiles_for_sm90_and_branch_free_wide_steps_pipeline_the_loads():
    """The forward at NSA's shape compiles for sm_90a (the interpreter never compiles it; a child
    process without it), with the alignment a launch specializes. With ``token_wide_steps``
    "masked" or "zeroed_v", tiles of 2 and 4 tokens issue as many asynchronous K/V tile copies
    (Triton's software pipelining) as one-token tiles; with the per-step branch ("branch") fewer;
    64 rows use warpgroup MMA."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops")
    results = source_in_child(_SM90_TOKEN_FORWARD, folder)
    for name, (returncode, report, _, _) in results.items():
        assert returncode == 0, (name, report)
    copies = {name: result[2] for name, result in results.items()}
    assert copies["0 1"] > 0
    for tokens in (2, 4):
        assert copies[f"1 {tokens}"] == copies[f"2 {tokens}"] == copies["0 1"] > copies[f"0 {tokens}"], copies
    assert all(results[f"{mode} 4"][3] for mode in (0, 1, 2))


_SM90_TOKEN_DKDV = """
import json, re, sys
sys.path.insert(0, sys.argv[1])
from triton_sm90_compile import async_tile_copies, compile_for_sm90
from sparse_attn.backends.triton_tokens_backward import _token_dkdv
pointers = {name: "*bf16" for name in ("Q", "K", "V", "DOut", "DK", "DV")}
pointers.update({name: "*fp32" for name in ("Lse", "Delta", "PartDK", "PartDV")})
pointers.update({name: "*i32" for name in ("TTiles", "TBits", "ItemCombo", "ItemChunk", "ItemPartial")})
pointers.update({name: "*i64" for name in ("TOffsets", "ItemStart", "ItemEnd")})
pointers.update(scale="fp32", qk_scale="fp32")
results = {}
for narrow in (False, True):
    for tokens, entries in ((1, 4), (4, 1)):  # NSA's 16-head group, 64 rows per product
        constexprs = dict(HEAD_DIM=128, BLOCK_Q=1, BLOCK_K=64, HEADS=16, TILE_TOKENS=tokens, ENTRIES=entries,
                          BLOCK_M=64, BLOCK_N=64, CAUSAL=True, DOT_FP32=False, PRECISION="tf32", SKIP_EARLY=False,
                          NARROW=narrow)
        ttgir = []
        returncode, report, ptx = compile_for_sm90(_token_dkdv, pointers, constexprs, 8, num_stages=2, ttgir=ttgir)
        results[f"{narrow} {tokens}"] = [returncode, report, async_tile_copies(ttgir[0], 128), "wgmma" in ptx]
# 5 stages against 2: copies left in flight at a wait.
for stages in (2, 5):
    ttgir = []
    compile_for_sm90(_token_dkdv, pointers, dict(constexprs, TILE_TOKENS=1, ENTRIES=4), 8, num_stages=stages, ttgir=ttgir)
    results[f"in flight {stages}"] = max(int(n) for n in re.findall(r"async_wait [^{]*[{]num = ([0-9]+)", ttgir[0]))
print(json.dumps(results))
"""


def _stack_bytes(report: list[str]) -> int:
    """The spill stack ptxas -v reports (0 where it reports none)."""
    found = re.search(r"(\d+) bytes cumulative stack size", " ".join(report))
    return int(found.group(1)) if found else 0


def test_token_dkdv_compiles_for_sm90_with_either_row_offsets():
    """dK/dV at NSA's shape (one- and four-token tiles, 64 rows x 64 keys, 8 warps, 2 stages)
    compiles for sm_90a with int32 and int64 row offsets; the gathered Q/dO rows are copied
    asynchronously, the products use warpgroup MMA, and int32 offsets spill no more than int64.
    Copies stay in flight across steps at 5 stages, not at 2 (the depths the autotuner is
    offered, 1 and 2, are those it took on an H100: triton_tokens_backward.STAGES)."""
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops")
    results = source_in_child(_SM90_TOKEN_DKDV, folder)
    # At 2 stages every step waits for all of its copies; at 5 some stay in flight.
    assert results.pop("in flight 2") == 0 and results.pop("in flight 5") > 0
    assert len(results) == 4
    for name, (returncode, report, copies, wgmma) in results.items():
        assert returncode == 0, (name, report)
        assert copies > 0 and wgmma, (name, report)
    for tokens in (1, 4):
        assert _stack_bytes(results[f"True {tokens}"][1]) <= _stack_bytes(results[f"False {tokens}"][1]), results


def test_wide_steps_selection():
    assert triton_tokens.wide_steps() == triton_tokens.WIDE_STEPS_BY_DEFAULT == "branch"
    for asked in ("branch", "masked", "zeroed_v"):
        with kernel_configs(token_wide_steps=asked):
            assert triton_tokens.wide_steps() == asked
    with pytest.raises(ValueError, match="token_wide_steps"), kernel_configs(token_wide_steps=True):
        pass


def test_zeroed_v_flags_blocks_and_columns():
    v = torch.randn(2, 3, 10, 4)
    v[1, 2, 7, 1] = float("nan")
    v[0, 0, 2, 3] = float("inf")
    clean, any_bad, columns = triton_tokens.zeroed_v(v, 4)  # blocks [0, 4), [4, 8), [8, 10)
    assert torch.isfinite(clean).all() and clean[1, 2, 7, 1] == 0 and clean[0, 0, 2, 3] == 0
    finite = torch.isfinite(v)
    assert torch.equal(clean[finite], v[finite])
    assert any_bad.shape == (2, 3, 3) and columns.shape == (2, 3, 3, 4)
    assert any_bad.nonzero().tolist() == [[0, 0, 0], [1, 2, 1]]
    assert columns.nonzero().tolist() == [[0, 0, 0, 3], [1, 2, 1, 1]]


def test_triton_backend_routes_small_query_blocks_to_the_token_kernel():
    small = sa.random_pattern(seq_q=32, density=0.5, block_q=4, block_k=16)
    large = sa.random_pattern(seq_q=32, density=0.5, block_q=16, block_k=16)
    assert _backend_module("triton", small) is triton_tokens
    assert _backend_module("triton", large).__name__.endswith("backends.triton")
    assert _backend_module("gluon", small).__name__.endswith("backends.gluon")  # gluon falls back to triton


@pytest.mark.parametrize("block_k, wide_steps", [(8, "branch"), (8, "masked"), (8, "zeroed_v"), (256, "branch")])
def test_non_finite_v_reaches_only_the_rows_that_list_its_block(block_k, wide_steps, poison_outputs):
    """A tile's union holds blocks some of its rows do not list: their zero weights must not
    carry a NaN of V into them (the documented rule, per query block = per token here). On the
    gathered path, a row's partial over the poisoned block must reach the merge, a causally
    hidden one included."""
    seq_q = seq_k = 5 * block_k
    q, k, v = random_qkv(1, 2, 2, seq_q, seq_k, 16, seed=4)
    v[0, 1, 5, 3] = float("nan")  # seen by later tokens of block 0, causally hidden from the first five
    # Lists per query head: 16-token tiles, where only even tokens list block 0 (besides their own).
    mask = torch.zeros(2, seq_q, 5, dtype=torch.bool)
    mask[:, ::2, 0] = True
    pattern = sa.BlockSparsePattern.from_mask(mask, block_q=1, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=True)
    with kernel_configs(token_wide_steps=wide_steps):
        out = sa.block_sparse_attention(q, k, v, pattern, backend="triton")
    assert torch.equal(~torch.isfinite(out), expected_nonfinite(q, k, v, pattern, True))


def test_unlisted_keys_get_zero_gradients(poison_outputs):
    q, k, v = random_qkv(1, 4, 2, 12, 48, 16, seed=5)
    mask = torch.zeros(2, 12, 3, dtype=torch.bool)
    mask[:, :, 0] = True
    pattern = sa.BlockSparsePattern.from_mask(mask, block_q=1, block_k=16, seq_q=12, seq_k=48, causal=False)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    sa.block_sparse_attention(*leaves, pattern, causal=False, backend="triton").sum().backward()
    for grad in (k.grad, v.grad):
        assert torch.isfinite(grad[:, :, :16]).all() and grad[:, :, :16].abs().sum() > 0
        assert torch.equal(grad[:, :, 16:], torch.zeros_like(grad[:, :, 16:]))


def _dense_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = torch.arange(k.shape[2])[None, :] <= torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)


@pytest.mark.parametrize("share_in_group", [False, True])
def test_moba_with_every_block_is_dense_causal_attention(share_in_group, poison_outputs):
    q, k, v = random_qkv(2, 6, 3, 19, 30, 16, seed=6)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = sa.sparse_attention(
        *leaves, method="moba", block_size=7, top_k=5, share_in_group=share_in_group, backend="triton"
    )
    dense = [x.clone().double().requires_grad_() for x in (q, k, v)]
    expected = _dense_causal(*dense)
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]
    dout = torch.randn_like(out)
    out.backward(dout)
    expected.backward(dout.double())
    for got, want in zip(leaves, dense, strict=True):
        assert relative_error(got.grad, want.grad) <= TOLERANCE[torch.float32]


# The oracle of the GPU tests below: exact float32 attention of sampled query rows, checked here
# against the float64 dense oracle (forward, and gradients of a loss on those rows only).
ROW_ORACLE_CASES = [
    ((1, 4, 2, 37, 37, 16, 1, 8), True, "kv", 1),
    ((2, 12, 4, 21, 45, 32, 1, 7), True, "query", 2),
    ((2, 6, 3, 19, 40, 16, 2, 16), False, "shared", 2),
    ((3, 8, 8, 30, 30, 16, 4, 5), True, "kv", 1),  # the pattern broadcast over the batch
]


@pytest.mark.parametrize("shape, causal, heads_kind, pattern_batch", ROW_ORACLE_CASES, ids=str)
def test_row_oracle_matches_float64_oracle(shape, causal, heads_kind, pattern_batch):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, *_ = shape
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    seed = ROW_ORACLE_CASES.index((shape, causal, heads_kind, pattern_batch))
    pattern = shape_pattern((pattern_batch, *shape[1:]), heads=heads, density=0.4, causal=causal, seed=seed)
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seed)
    rows = sample_rows(seq_q, 9, boundaries=(4, 8), seed=seed)
    assert rows[0] == 0 and rows[-1] == seq_q - 1 and len(rows) < seq_q
    generator = torch.Generator().manual_seed(seed)
    dout = torch.randn((batch, q_heads, len(rows), dim), generator=generator)
    dlse = torch.randn((batch, q_heads, len(rows)), generator=generator)
    full_dout, full_dlse = torch.zeros(q.shape), torch.zeros(q.shape[:3])
    full_dout[:, :, rows], full_dlse[:, :, rows] = dout, dlse
    want_out, want_lse, want_grads = _oracle(q, k, v, pattern, causal, full_dout, full_dlse)
    # A budget of a few rows' scores makes several chunks over rows and heads.
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = row_attention(*leaves, pattern, rows, causal=causal, budget=3 * seq_k * batch)
    torch.autograd.backward((out, lse), (dout, dlse))
    assert out.dtype == torch.float32 and out.shape == (batch, q_heads, len(rows), dim)
    assert relative_error(out.detach(), want_out[:, :, rows]) <= 1e-5
    assert relative_error(lse.detach(), want_lse[:, :, rows]) <= 1e-5
    for name, got, want in zip("qkv", (x.grad for x in leaves), want_grads, strict=True):
        assert relative_error(got, want) <= 1e-5, f"d{name}"
    all_rows, _ = row_attention(q, k, v, pattern, torch.arange(seq_q), causal=causal)
    assert relative_error(all_rows, want_out) <= 1e-5


def _gpu_check(q, k, v, pattern, rows, *, causal=True, seed=0):
    """The triton backend on the whole problem against :func:`helpers.row_attention` (float32) at
    ``rows``: output and LSE there, and the gradients of a loss on those rows only (random output
    and LSE cotangents there, zero elsewhere): dQ at the rows (exactly zero elsewhere), dK and dV
    in full. With every row sampled this is a full forward and gradient check."""
    rows = rows.to(q.device)
    generator = torch.Generator(device=q.device).manual_seed(seed)
    dout = torch.randn((*q.shape[:2], len(rows), q.shape[3]), generator=generator, device=q.device)
    dlse = torch.randn((*q.shape[:2], len(rows)), generator=generator, device=q.device)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the triton backend runs it: no fallback warning
        out, lse = sa.block_sparse_attention(*leaves, pattern, causal=causal, backend="triton", return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "output or lse not finite (unwritten?)"
    full_dout, full_dlse = torch.zeros_like(out), torch.zeros_like(lse)
    full_dout[:, :, rows], full_dlse[:, :, rows] = dout.to(q.dtype), dlse
    torch.autograd.backward((out, lse), (full_dout, full_dlse))
    exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want_out, want_lse = row_attention(*exact, pattern, rows, causal=causal)
    torch.autograd.backward((want_out, want_lse), (full_dout[:, :, rows].float(), dlse))
    tolerance = TOLERANCE[q.dtype]
    assert relative_error(out[:, :, rows].detach(), want_out.detach()) <= tolerance, "out"
    assert relative_error(lse[:, :, rows].detach(), want_lse.detach()) <= tolerance, "lse"
    others = torch.ones(q.shape[2], dtype=torch.bool, device=q.device)
    others[rows] = False
    dq = leaves[0].grad
    assert torch.isfinite(dq).all() and torch.equal(dq[:, :, others], torch.zeros_like(dq[:, :, others])), "dq"
    assert relative_error(dq[:, :, rows], exact[0].grad[:, :, rows]) <= tolerance, "dq"
    for name, got, want in zip("kv", leaves[1:], exact[1:], strict=True):
        assert got.grad.dtype == q.dtype and torch.isfinite(got.grad).all(), f"d{name} not finite"
        assert relative_error(got.grad, want.grad) <= tolerance, f"d{name}"


# GPU tests: the kernel runs the whole long problem and is checked on ~300 sampled rows (the
# first and last, both sides of 16/64/block edges, random ones) with the gradients of a loss on
# them (dK/dV in full), plus a full check (every row) at a shorter length. (The reference backend
# these tests used before gathers every query block's keys apart: with one-token blocks, a Python
# step per query row and head chunk, minutes to hours at 32K-128K.) Runtime estimates: the oracle
# costs ~8 float32 matmul passes over its score elements E (query rows x heads x keys, computed
# densely): measured on CPU, 314 rows x 64 heads x 8K keys (E = 0.16G) took 18.6 s on 8 cores
# (matmuls at ~60 GFLOP/s); at the H200's ~60 TFLOP/s float32 and ~4 TB/s that is ~0.1 s per G
# of E. The kernels take milliseconds (the NSA-like selection at 32K: 13.6 ms forward in the
# token benchmark). Not counted: Triton compilation and autotuning (up to 16 configurations per
# pass and key: forward, dQ, dK/dV), cached on disk after the first run.
ROWS = 320


def _cuda_qkv(q_heads, kv_heads, seq, dim, dtype, seed):
    """Random q, k, v drawn on the GPU (random_qkv draws on the CPU: 20 s for 128K x 68 heads on 2 cores)."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.randn((1, heads, seq, dim), generator=generator, device="cuda").to(dtype)
        for heads in (q_heads, kv_heads, kv_heads)
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("share_in_group", [False, True])
def test_gpu_moba_at_32k(share_in_group, poison_outputs):
    """MoBA at the paper's settings (blocks of 4096, top 12: at 32K every earlier block) on 32/8
    heads: sampled rows at 32K; at 8K with blocks of 1024 and top 3 (sparse), every row.
    Estimate: E = 0.34G + 2.1G, ~0.3 s."""
    q, k, v = _cuda_qkv(32, 8, 32768, 128, torch.bfloat16, seed=21)
    pattern = sa.estimate(q, k, "moba", block_size=4096, top_k=12, share_in_group=share_in_group)
    assert pattern.block_q == 1 and pattern.num_heads == (8 if share_in_group else 32)
    _gpu_check(q, k, v, pattern, sample_rows(32768, ROWS, boundaries=(16, 64, 4096), seed=21))
    q, k, v = (x[:, :, :8192] for x in (q, k, v))
    pattern = sa.estimate(q, k, "moba", block_size=1024, top_k=3, share_in_group=share_in_group)
    _gpu_check(q, k, v, pattern, torch.arange(8192), seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dim, dtype", [(64, torch.float16), (128, torch.float32)])
def test_gpu_moba_512_gathered_path(dim, dtype, poison_outputs):
    """MoBA's 512-token blocks (the gathered path) on 12/4 heads, head_dim 64 in fp16 and 128 in
    fp32: sampled rows at 16K, every row at 4K. Estimate: E = 0.06G + 0.2G, < 0.1 s."""
    q, k, v = _cuda_qkv(12, 4, 16384, dim, dtype, seed=24)
    _gpu_check(q, k, v, sa.estimate(q, k, "moba", block_size=512, top_k=3), sample_rows(16384, ROWS, seed=24))
    q, k, v = (x[:, :, :4096] for x in (q, k, v))
    _gpu_check(q, k, v, sa.estimate(q, k, "moba", block_size=512, top_k=3), torch.arange(4096), seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("loads", [("rows",), ("tma",)])
def test_gpu_gathered_forward_load_kinds(loads, poison_outputs):
    """The gathered forward with each K/V load kind forced (pointer loads, tensor descriptors),
    bf16 on 12/4 heads, head_dim 128, MoBA with 720-token blocks (VMoBA's 2D block length: not
    a multiple of any key step), every row at 4K. Estimate: E = 0.2G, < 0.1 s."""
    q, k, v = _cuda_qkv(12, 4, 4096, 128, torch.bfloat16, seed=25)
    pattern = sa.estimate(q, k, "moba", block_size=720, top_k=2)
    with kernel_configs(triton_loads=loads):
        _gpu_check(q, k, v, pattern, torch.arange(4096), seed=2)


def _nsa_like_pattern(seq, kv_heads, heads_kind, q_heads):
    """NSA's selected branch shape: blocks of 64, a quarter of each token's earlier blocks, its own always."""
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    return sa.random_pattern(heads=heads, seq_q=seq, density=0.25, seed=22, block_q=1, block_k=64, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("tile_blocks, heads_kind", [(1, "kv"), (4, "kv"), (1, "query")])
def test_gpu_lists_and_work_build_without_waiting(tile_blocks, heads_kind):
    """The union lists, their transpose and the dK/dV work items are built without one wait on
    the device (``torch.cuda.set_sync_debug_mode("error")`` raises at any), so the host can queue
    kernels behind them; the number of partial slots arrives through its event."""
    from sparse_attn.backends import triton_tokens_backward as tb

    q_heads, kv_heads = 64, 4
    pattern = _nsa_like_pattern(8192, kv_heads, heads_kind, q_heads)
    heads = 16 if heads_kind == "kv" else 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lists = triton_tokens.token_lists(pattern, tile_blocks)
        work = tb.dkdv_work(
            pattern, lists.t_offsets, batch=2, q_heads=q_heads, kv_heads=kv_heads, heads=heads,
            entries=max(1, 64 // (heads * tile_blocks)),
        )  # fmt: skip
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert lists.offsets[-1] == lists.t_offsets[-1] > 0
    assert work.partials >= 0 and (work.combo >= 0).sum() >= 2 * kv_heads * pattern.num_kv_blocks


@pytest.mark.gpu
def test_gpu_gathered_work_builds_without_waiting():
    """The gathered path's work items and its one-block lists (MoBA-like: lists per query head,
    64-key blocks) are built without one wait on the device."""
    from sparse_attn.backends import triton_tokens_gathered as gathered

    pattern = _nsa_like_pattern(8192, 8, "query", 32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        work = gathered.gathered_work(pattern, 2, 32, 1, 64)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    real = work.combos >= 0
    assert real.any() and not real[int(real.sum()) :].any()  # the spare items last


@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads, heads_kind",
    [((64, 4), "kv"), ((48, 4), "kv"), ((32, 8), "kv"), ((28, 4), "kv"), ((12, 12), "query"), ((16, 1), "shared")],
)
def test_gpu_nsa_like_selection(heads, heads_kind, poison_outputs):
    """Blocks of 64 chosen per token (a quarter of the earlier ones, its own always): GQA groups
    16/12/4/7, 1 (lists per query head) and 16 (one KV head, shared lists); every row at 8K,
    sampled rows at 32K (up to 128 blocks per token). Estimate: E up to 0.7G + 4.3G (64 heads),
    ~0.5 s."""
    q_heads, kv_heads = heads
    q, k, v = _cuda_qkv(q_heads, kv_heads, 32768, 128, torch.bfloat16, seed=22)
    pattern = _nsa_like_pattern(32768, kv_heads, heads_kind, q_heads)
    _gpu_check(q, k, v, pattern, sample_rows(32768, ROWS, seed=22))
    q, k, v = (x[:, :, :8192] for x in (q, k, v))
    _gpu_check(q, k, v, _nsa_like_pattern(8192, kv_heads, heads_kind, q_heads), torch.arange(8192), seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("heads, heads_kind, rows", [((12, 12), "query", 16), ((28, 4), "kv", 16), ((64, 4), "kv", 64)])
@pytest.mark.parametrize("wide_steps", ["masked", "zeroed_v"])
def test_gpu_branch_free_steps_on_wide_tiles(heads, heads_kind, rows, wide_steps, poison_outputs):
    """``kernel_configs(token_wide_steps=...)`` "masked" and "zeroed_v" on tiles of several tokens:
    lists per query head (16 tokens a tile), a group of 7 (two tokens) and NSA's group of 16 with
    64 rows (four tokens); sampled rows at 32K, every row at 8K."""
    q_heads, kv_heads = heads
    q, k, v = _cuda_qkv(q_heads, kv_heads, 32768, 128, torch.bfloat16, seed=23)
    with kernel_configs(token_wide_steps=wide_steps, token_rows=rows):
        _gpu_check(q, k, v, _nsa_like_pattern(32768, kv_heads, heads_kind, q_heads), sample_rows(32768, ROWS, seed=23))
        q, k, v = (x[:, :, :8192] for x in (q, k, v))
        _gpu_check(q, k, v, _nsa_like_pattern(8192, kv_heads, heads_kind, q_heads), torch.arange(8192), seed=1)


@pytest.mark.gpu
@pytest.mark.parametrize("skip_early", [True, False])
def test_gpu_nsa_like_dkdv_skip_modes(skip_early, monkeypatch, poison_outputs):
    """NSA's group of 16 at 8K, every row, with the causal dK/dV early skip on and off."""
    from sparse_attn.backends import triton_tokens_backward

    monkeypatch.setattr(triton_tokens_backward, "DKDV_SKIP_EARLY", skip_early)
    q, k, v = _cuda_qkv(64, 4, 8192, 128, torch.bfloat16, seed=23)
    _gpu_check(q, k, v, _nsa_like_pattern(8192, 4, "kv", 64), torch.arange(8192), seed=2)


@pytest.mark.gpu
def test_gpu_one_token_tiles_at_128k(poison_outputs):
    """128K one-token query tiles (more than a CUDA grid's second axis takes): NSA's shape with
    16 blocks of 64 per token (its own and every fifth before it); sampled rows, those around
    65536 among them, with gradients on them (dK/dV in full). Estimate: E = 2.8G, ~0.3 s."""
    seq, kv_heads = 131072, 4
    pattern = _strided_nsa_pattern(seq, kv_heads)
    q, k, v = _cuda_qkv(64, kv_heads, seq, 128, torch.bfloat16, seed=23)
    rows = sample_rows(seq, ROWS, extra=range(65535 - 2, 65536 + 3), seed=23)
    _gpu_check(q, k, v, pattern, rows)


def _strided_nsa_pattern(seq, kv_heads):
    """16 blocks of 64 per token, its own and every fifth before it, one list per KV head: the
    tokens of one 64-block list the same blocks."""
    own = torch.arange(seq, device="cuda") // 64
    blocks = own[:, None] - torch.arange(15, -1, -1, device="cuda") * 5  # ascending, the own block last
    counts = (blocks >= 0).sum(-1, dtype=torch.int32)
    # Drop the negative entries: shift each row's kept blocks to its front.
    order = torch.sort((blocks < 0).to(torch.uint8), dim=-1, stable=True).indices
    indices = torch.where(torch.arange(16, device="cuda") < counts[:, None], blocks.gather(-1, order), 0)
    return sa.BlockSparsePattern(
        kv_counts=counts.expand(1, kv_heads, seq).contiguous(),
        kv_indices=indices.to(torch.int32).expand(1, kv_heads, seq, 16).contiguous(),
        block_q=1,
        block_k=64,
        seq_q=seq,
        seq_k=seq,
    )


@pytest.mark.gpu
def test_gpu_overlap_rows(poison_outputs):
    """``token_rows="overlap"`` at NSA's 64/4 heads, 8K, every row: four-token ``zeroed_v`` tiles
    on lists neighbours share, one-token tiles on random lists."""
    seq = 8192
    q, k, v = _cuda_qkv(64, 4, seq, 128, torch.bfloat16, seed=24)
    for pattern, tile_blocks in ((_strided_nsa_pattern(seq, 4), 4), (_nsa_like_pattern(seq, 4, "kv", 64), 1)):
        with kernel_configs(token_rows="overlap"):
            _gpu_check(q, k, v, pattern, torch.arange(seq), seed=3)
            assert triton_tokens.token_tiling(64, 4, 4, 1, pattern).tile_blocks == tile_blocks


@pytest.mark.gpu
@pytest.mark.parametrize("block_k", [64, 512])
def test_gpu_backward_plan_waits_for_the_forward_lists(block_k):
    """The dK/dV plan built on the side stream (prepare_backward) from lists the forward queued on
    the default stream waits for them (``TokenLists.ready``): with the default stream held back by
    a long sleep before the lists' build, the work items equal those built on one stream. Lists
    per query head take the forward's 16-token tiles (block 64) or the gathered path's one-block
    lists (block 512) for their dK/dV pass, both built by the forward."""
    from sparse_attn.backends import triton_tokens_backward
    from sparse_attn.plan import plan_for

    q, k, _ = _cuda_qkv(12, 12, 4096, 64, torch.bfloat16, seed=25)
    source = sa.random_pattern(heads=12, seq_q=4096, density=0.25, seed=25, block_q=1, block_k=block_k, device="cuda")

    def fresh():
        return sa.BlockSparsePattern(
            kv_counts=source.kv_counts.clone(), kv_indices=source.kv_indices.clone(), block_q=1, block_k=block_k,
            seq_q=4096, seq_k=4096,
        )  # fmt: skip

    reference, pattern = fresh(), fresh()
    tiling, _, _, expected = triton_tokens_backward.dkdv_plan(q, k, reference)
    torch.cuda.synchronize()
    ready = torch.cuda.Event()
    ready.record()  # the pattern is ready; then the default stream sleeps before building the lists
    torch.cuda._sleep(1_000_000_000)  # about half a second
    triton_tokens.token_lists(pattern, tiling.tile_blocks)
    triton_tokens_backward.prepare_backward(q, k, plan_for(pattern, causal=True), ready)
    torch.cuda.synchronize()
    got = triton_tokens_backward.dkdv_plan(q, k, pattern)[3]
    for name in ("combo", "chunk", "start", "end", "partial", "sum_combos", "sum_first", "sum_counts"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.partials == expected.partials


@pytest.mark.gpu
@pytest.mark.parametrize("heads_kind, path", [("kv", "tile"), ("query", "tile"), ("query", "gathered")])
def test_gpu_backward_lists_are_built_during_the_forward(heads_kind, path, monkeypatch, poison_outputs):
    """Under autograd on CUDA the dK/dV pass's lists and work items are built during the forward
    (on a side stream from the point the pattern was ready): after the forward they are cached
    on the pattern, and the gradients equal, bit for bit, those of a backward that builds them
    itself. The pattern is written by a kernel queued just before (as an estimator's would be).
    Both paths of the token kernels (lists per query head take the gathered one by default)."""
    from sparse_attn.backends import triton_tokens_backward

    q, k, v = _cuda_qkv(32, 4, 4096, 128, torch.bfloat16, seed=24)
    dout = torch.randn_like(q)
    grads = []
    for prepared in (True, False):
        source = _nsa_like_pattern(4096, 4, heads_kind, 32)
        pattern = sa.BlockSparsePattern(
            kv_counts=source.kv_counts.clone(), kv_indices=source.kv_indices.clone(), block_q=1, block_k=64,
            seq_q=4096, seq_k=4096,
        )  # fmt: skip
        if not prepared:
            monkeypatch.setattr(triton_tokens_backward, "prepare_backward", lambda *args: None)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        with kernel_configs(token_path=path):  # (the backward runs under the forward's configs)
            out = sa.block_sparse_attention(*leaves, pattern, backend="triton")
        tiling = triton_tokens.token_tiling(32, 4, pattern.num_heads, 1)
        tokens = 1 if path == "gathered" else tiling.tile_tokens  # the gathered path: one-token tiles
        entries = triton_tokens_backward.DKDV_ROWS // (tiling.heads * tokens)
        key = ("token_dkdv_work", 1, 32, 4, tiling.heads, entries)
        assert (pattern.cached_plan(key) is not None) == prepared
        out.backward(dout)
        assert pattern.cached_plan(key) is not None
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads, strict=True):
        assert torch.isfinite(got).all() and torch.equal(got, want)
