"""Spatial methods (neighborhood, sliding_tile, radial) against brute-force token-level references.

Each reference builds the method's token mask in the caller's (raster) order from its
paper's definition, one query at a time, and the dense float64 masked attention over it.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from helpers import poisoned_allocate, random_qkv, relative_error

import sparse_attn as sa
from sparse_attn.backends import flash4, flex, resolve_backend
from sparse_attn.layouts import Layout, default_tile
from sparse_attn.plan import plan_for

# NATTEN's window start (its CPU kernels' rule, odd kernels), written out independently of the method.


def natten_start(index: int, length: int, kernel: int, dilation: int) -> int:
    half = kernel // 2
    if dilation <= 1:
        return max(index - half, 0) + ((length - index - half - 1) if index + half >= length else 0)
    if index - half * dilation < 0:
        return index % dilation
    if index + half * dilation >= length:
        residue = index % dilation
        whole = (length // dilation) * dilation
        rest = length - whole
        if residue < rest:
            return length - rest + residue - 2 * half * dilation
        return whole + residue - kernel * dilation
    return index - half * dilation


def natten_neighbours(index: int, length: int, kernel: int, dilation: int, stride: int) -> set[int]:
    """Keys of ``index``: the NATTEN window of its stride group's leader (GNA), in one dimension."""
    residue, x = index % dilation, index // dilation
    group_size = len(range(residue, length, dilation))
    leader = min((x // stride) * stride + stride // 2, group_size - 1) * dilation + residue
    start = natten_start(leader, length, kernel, dilation)
    return {start + t * dilation for t in range(kernel)}


def sta_neighbours(index: int, length: int, tile: int, window: int) -> set[int]:
    n_tiles = -(-length // tile)
    start = min(max(index // tile - window // 2, 0), n_tiles - window)
    return set(range(start * tile, min((start + window) * tile, length)))


def grid_token_mask(layout: Layout, neighbours_per_dim) -> torch.Tensor:
    """Bool (S, S) in raster order: product windows between grid tokens, text rows and columns all True."""
    grid = layout.grid
    allowed = [
        torch.tensor([[j in neighbours(i) for j in range(size)] for i in range(size)])
        for size, neighbours in zip(grid, neighbours_per_dim, strict=True)
    ]
    coords = list(itertools.product(*[range(g) for g in grid]))
    grid_mask = torch.ones(len(coords), len(coords), dtype=torch.bool)
    index = torch.tensor(coords)
    for d in range(len(grid)):
        grid_mask &= allowed[d][index[:, d][:, None], index[:, d][None, :]]
    mask = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
    start = layout.grid_start
    mask[start : start + layout.grid_tokens, start : start + layout.grid_tokens] = grid_mask
    return mask


def masked_attention(q, k, v, mask):
    """Float64 dense attention under a token mask (S, S); GQA by repeating K/V."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def block_expanded(pattern, layout: Layout) -> torch.Tensor:
    """Bool (S, S) in the caller's order: the token pairs inside the pattern's kept blocks."""
    blocks = pattern.to_mask()[0, 0]
    tokens = blocks.repeat_interleave(pattern.block_q, 0).repeat_interleave(pattern.block_k, 1)
    tokens = tokens[: pattern.seq_q, : pattern.seq_k]
    inverse = layout.inverse()
    return tokens[inverse][:, inverse]


NEIGHBORHOOD_CASES = [
    # grid, window, dilation, stride, tile, text_tokens, text_position, block
    ((37,), 7, 2, 1, (8,), 0, "after", 8),
    ((9, 11), (3, 5), (1, 2), (1, 2), (4, 4), 5, "before", 16),
    ((5, 6, 7), (3, 3, 5), 1, (1, 2, 1), (2, 3, 4), 3, "after", 16),
    ((4, 14, 12), (3, 5, 3), (1, 1, 2), (3, 1, 1), (2, 4, 4), 0, "after", 32),
]


@pytest.mark.parametrize("grid, window, dilation, stride, tile, text, position, block", NEIGHBORHOOD_CASES)
def test_neighborhood_equals_natten_reference(grid, window, dilation, stride, tile, text, position, block):
    layout = Layout(grid, tile=tile, text_tokens=text, text_position=position)
    rank = len(grid)
    per = [(x,) * rank if isinstance(x, int) else x for x in (window, dilation, stride)]
    neighbours = [
        lambda i, size=size, w=w, r=r, s=s: natten_neighbours(i, size, w, r, s)
        for size, w, r, s in zip(grid, *per, strict=True)
    ]
    mask = grid_token_mask(layout, neighbours)
    q, k, v = random_qkv(2, 6, 3, layout.seq_len, layout.seq_len, 16, seed=sum(grid))
    options = dict(grid=grid, window=window, dilation=dilation, stride=stride, tile=tile)
    options.update(text_tokens=text, text_position=position, block_q=block, block_k=block)
    out, info = sa.sparse_attention(
        q, k, v, "neighborhood", causal=False, backend="reference", return_info=True, **options
    )
    assert relative_error(out, masked_attention(q, k, v, mask)) < 1e-5
    pattern = info.pattern
    # The kept blocks cover every window; every query has exactly prod(window) grid neighbours.
    assert bool((mask <= block_expanded(pattern, layout)).all())
    start = layout.grid_start
    grid_rows = mask[start : start + layout.grid_tokens, start : start + layout.grid_tokens]
    assert bool((grid_rows.sum(-1) == math.prod(per[0])).all())
    assert info.density < 1.0


@pytest.mark.parametrize(
    "grid, window, text, block", [((7, 10, 12), (3, 5, 5), 4, 32), ((12, 21), 5, 6, 16), ((6, 9, 16), 3, 0, 64)]
)
def test_neighborhood_without_a_tile_takes_the_candidate_keeping_fewest_blocks(grid, window, text, block):
    from sparse_attn.methods.neighborhood import candidate_tiles

    q, k, v = random_qkv(1, 2, 1, math.prod(grid) + text, math.prod(grid) + text, 16, seed=len(grid))
    options = dict(grid=grid, window=window, text_tokens=text, block_q=block, block_k=block)
    out, info = sa.sparse_attention(
        q, k, v, "neighborhood", causal=False, backend="reference", return_info=True, **options
    )
    tiles = candidate_tiles(grid, block)
    assert tiles[:2] == [default_tile(len(grid)), None] and all(math.prod(t) == block for t in tiles[2:])
    counts = {}
    for tile in tiles:
        fixed = sa.estimate(q, k, "neighborhood", causal=False, tile=tile or grid, **options)
        counts[tile] = int(fixed.kv_counts.sum())
        if fixed.layout.tile == info.pattern.layout.tile:
            assert torch.equal(fixed.kv_counts, info.pattern.kv_counts)
    assert int(info.pattern.kv_counts.sum()) == min(counts.values())
    # Any tile gives NATTEN's attention exactly: the default tile's result is the same.
    reference = sa.sparse_attention(
        q, k, v, "neighborhood", causal=False, backend="reference", tile=tiles[0], **options
    )
    assert relative_error(out, reference) < 1e-5


def test_neighborhood_blocks_are_exactly_those_holding_a_window_pair_on_whole_tiles():
    grid, tile = (4, 8, 12), (2, 4, 4)
    layout = Layout(grid, tile=tile)
    q, k, _ = random_qkv(1, 1, 1, layout.seq_len, layout.seq_len, 8, seed=0)
    pattern = sa.estimate(
        q, k, "neighborhood", causal=False, grid=grid, window=(3, 5, 5), tile=tile, block_q=32, block_k=32
    )
    neighbours = [lambda i, n=n, w=w: natten_neighbours(i, n, w, 1, 1) for n, w in zip(grid, (3, 5, 5), strict=True)]
    mask = grid_token_mask(layout, neighbours)
    order = layout.order()
    permuted = mask[order][:, order].view(layout.seq_len // 32, 32, layout.seq_len // 32, 32)
    assert torch.equal(pattern.to_mask()[0, 0], permuted.any(3).any(1))
    assert pattern.token_rule is not None


def test_gna_stride_equal_to_tile_is_block_exact_and_runs_on_the_kernel(poison_outputs):
    # Tiles divide the grid, a block is one tile, stride = tile and windows of 1 or 3 tiles: every
    # window starts on a tile edge, so no block is partial and the block kernel computes it.
    grid, tile = (2, 16, 16), (1, 4, 4)
    layout = Layout(grid, tile=tile)
    q, k, v = random_qkv(1, 2, 1, layout.seq_len, layout.seq_len, 16, seed=1)
    options = dict(grid=grid, tile=tile, window=(1, 12, 12), stride=(1, 4, 4), block_q=16, block_k=16)
    pattern = sa.estimate(q, k, "neighborhood", causal=False, **options)
    assert pattern.token_rule is None and pattern.density(causal=False) < 0.6
    # Even windows (GNA): the odd-window NATTEN reference does not apply, so the GNA rule is written out.
    expected = masked_attention(q, k, v, _gna_even_window_mask(layout, (1, 12, 12), (1, 4, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: the kernel runs it
        out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="triton")
    assert relative_error(out, expected) < 1e-4
    assert (
        relative_error(sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference"), expected) < 1e-5
    )


def _gna_even_window_mask(layout: Layout, window, stride) -> torch.Tensor:
    """GNA with any window size: the window of ``w`` keys starting at clamp(leader - w // 2, 0, L - w)."""

    def neighbours(i, size, w, s):
        leader = min((i // s) * s + s // 2, size - 1)
        start = min(max(leader - w // 2, 0), size - w)
        return set(range(start, start + w))

    per_dim = [
        lambda i, n=n, w=w, s=s: neighbours(i, n, w, s) for n, w, s in zip(layout.grid, window, stride, strict=True)
    ]
    return grid_token_mask(layout, per_dim)


@pytest.mark.parametrize(
    "grid, tile, window, text, block, exact",
    [
        ((4, 16, 16), (2, 4, 4), (1, 3, 3), 0, 32, True),
        ((4, 12, 16), (2, 4, 4), (1, 3, 3), 32, 32, True),
        ((5, 7, 9), (2, 4, 4), (3, 1, 3), 4, 32, False),
        ((8, 12), (4, 4), (1, 3), 0, 16, True),
        ((9, 10), (4, 4), (3, 1), 0, 16, False),
    ],
)
def test_sliding_tile_equals_tile_window_reference(grid, tile, window, text, block, exact):
    layout = Layout(grid, tile=tile, text_tokens=text)
    neighbours = [
        lambda i, n=n, t=t, w=w: sta_neighbours(i, n, t, w) for n, t, w in zip(grid, tile, window, strict=True)
    ]
    mask = grid_token_mask(layout, neighbours)
    q, k, v = random_qkv(2, 4, 4, layout.seq_len, layout.seq_len, 16, seed=len(grid))
    options = dict(grid=grid, tile=tile, window=window, text_tokens=text, block_q=block, block_k=block)
    pattern = sa.estimate(q, k, "sliding_tile", causal=False, **options)
    assert (pattern.token_rule is None) == exact
    out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference")
    assert relative_error(out, masked_attention(q, k, v, mask)) < 1e-5
    if exact:  # block-exact: the kept blocks are exactly the windows
        assert torch.equal(block_expanded(pattern, layout), mask)


def radial_token_mask(layout: Layout, decay: float, sink: int, block: int) -> torch.Tensor:
    frames, height, width = layout.grid
    per_frame = height * width
    mask = torch.ones(layout.seq_len, layout.seq_len, dtype=torch.bool)
    video = torch.zeros(layout.grid_tokens, layout.grid_tokens, dtype=torch.bool)
    s = torch.arange(per_frame)
    gap = (s[:, None] - s[None, :]).abs()
    for f, g in itertools.product(range(frames), range(frames)):
        d = abs(f - g)
        w = 2 ** per_frame.bit_length() * decay / 2 ** d.bit_length()
        if g < sink:
            tile = torch.ones(per_frame, per_frame, dtype=torch.bool)
        elif w >= block:
            tile = gap <= w
        else:
            tile = (gap <= block) & (d % max(1, math.floor(block / w)) == 0)
        video[f * per_frame : (f + 1) * per_frame, g * per_frame : (g + 1) * per_frame] = tile
    start = layout.grid_start
    mask[start : start + layout.grid_tokens, start : start + layout.grid_tokens] = video
    return mask


@pytest.mark.parametrize(
    "grid, decay, sink, text, position, block",
    [((9, 4, 5), 1.0, 1, 0, "after", 16), ((12, 3, 7), 0.5, 1, 7, "before", 16), ((8, 8, 8), 0.25, 2, 16, "after", 32)],
)
def test_radial_blocks_are_the_union_of_its_token_rule(grid, decay, sink, text, position, block):
    layout = Layout(grid, text_tokens=text, text_position=position)
    mask = radial_token_mask(layout, decay, sink, block)
    q, k, v = random_qkv(2, 6, 2, layout.seq_len, layout.seq_len, 16, seed=grid[0])
    options = dict(grid=grid, decay_factor=decay, sink_frames=sink, text_tokens=text, text_position=position)
    out, info = sa.sparse_attention(
        q, k, v, "radial", causal=False, block_q=block, block_k=block, return_info=True, **options
    )
    pattern = info.pattern
    n = -(-layout.seq_len // block)
    padded = torch.zeros(n * block, n * block, dtype=torch.bool)
    padded[: layout.seq_len, : layout.seq_len] = mask
    assert torch.equal(pattern.to_mask()[0, 0], padded.view(n, block, n, block).any(3).any(1))
    assert pattern.token_rule is None and info.density < 1.0
    assert relative_error(out, masked_attention(q, k, v, block_expanded(pattern, layout))) < 1e-5


def test_gradients_through_the_permutation_and_token_rule_match_the_oracle():
    grid, window, tile = (6, 7), (3, 5), (4, 4)
    layout = Layout(grid, tile=tile, text_tokens=2)
    neighbours = [lambda i, n=n, w=w: natten_neighbours(i, n, w, 1, 1) for n, w in zip(grid, window, strict=True)]
    mask = grid_token_mask(layout, neighbours)
    q, k, v = (x.requires_grad_() for x in random_qkv(2, 4, 2, layout.seq_len, layout.seq_len, 16, seed=3))
    options = dict(grid=grid, window=window, tile=tile, text_tokens=2, block_q=16, block_k=16)
    out = sa.sparse_attention(q, k, v, "neighborhood", causal=False, backend="reference", **options)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = torch.autograd.grad(masked_attention(q64, k64, v64, mask), (q64, k64, v64), grad.double())
    for got, want in zip(grads, expected, strict=True):
        assert relative_error(got, want) < 1e-5


def test_gluon_falls_back_to_triton_with_one_warning_and_flex_mask_is_exact():
    grid, window, tile = (5, 9), (3, 3), (4, 4)
    layout = Layout(grid, tile=tile, text_tokens=3)
    q, k, v = random_qkv(1, 2, 1, layout.seq_len, layout.seq_len, 16, seed=4)
    pattern = sa.estimate(
        q, k, "neighborhood", causal=False, grid=grid, window=window, tile=tile, text_tokens=3, block_q=16, block_k=16
    )
    assert pattern.partial_entries() > 0
    expected = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference")
    # The Gluon kernel computes whole blocks: the Triton kernel, which reads the rule as bitmasks, runs it.
    with pytest.warns(UserWarning, match="token-level rule") as caught:
        out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="gluon")
    caught = [w for w in caught if w.category is UserWarning]
    assert len(caught) == 1 and "using the triton backend" in str(caught[0].message)
    assert relative_error(out, expected) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # auto picks a backend that runs the rule, silently
        assert torch.equal(sa.block_sparse_attention(q, k, v, pattern, causal=False), expected)
    # FlexAttention with the plan's BlockMask (rule as mask_mod), run eagerly: no compile on CPU.
    from torch.nn.attention.flex_attention import flex_attention

    mask = flex.block_mask(plan_for(pattern, causal=False), num_q_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile": intended here
        permuted = flex_attention(*(layout.permute(x) for x in (q, k, v)), block_mask=mask, enable_gqa=True)
    assert relative_error(layout.unpermute(permuted), expected) < 1e-5


def test_masked_pattern_heads_device_and_union():
    grid = (4, 6)
    q, k, _ = random_qkv(1, 4, 2, 24, 24, 8, seed=5)
    pattern = sa.estimate(q, k, "neighborhood", causal=False, grid=grid, window=3, tile=(2, 2), block_q=8, block_k=8)
    expanded = pattern.expand_heads(4)
    assert expanded.rule_partial.shape == expanded.kv_indices.shape and expanded.num_heads == 4
    assert pattern.to("cpu").token_rule is not None and "token_rule=GridWindowRule" in repr(pattern)
    with pytest.raises(TypeError, match="union"):
        pattern.union(pattern)


@pytest.mark.parametrize(
    "method, options, causal, error, match",
    [
        ("neighborhood", dict(grid=(4, 6), window=3), True, ValueError, "causal=False"),
        ("neighborhood", dict(window=3), False, ValueError, "grid="),
        ("neighborhood", dict(grid=(5, 6), window=3), False, ValueError, "product 30"),
        ("neighborhood", dict(grid=(4, 6), window=5), False, ValueError, "window \\* dilation"),
        ("neighborhood", dict(grid=(4, 6), window=3, dilation=2), False, ValueError, "window \\* dilation"),
        ("neighborhood", dict(grid=(4, 6), window=3, stride=4), False, ValueError, "stride"),
        ("neighborhood", dict(grid=(4, 6), window=(3, 3, 3)), False, ValueError, "window"),
        ("neighborhood", dict(grid=(4, 6), window=0), False, ValueError, "window"),
        ("neighborhood", dict(grid=(4, 6), window=3, text_position="middle"), False, ValueError, "text_position"),
        ("sliding_tile", dict(grid=(4, 6), tile=(2, 2), window=(3, 4)), False, ValueError, "larger than the tile grid"),
        ("radial", dict(grid=(4, 6)), False, ValueError, "\\(T, H, W\\)"),
        ("radial", dict(grid=(2, 3, 4), decay_factor=0.0), False, ValueError, "decay_factor"),
    ],
)
def test_bad_spatial_calls_raise_naming_the_option(method, options, causal, error, match):
    q, k, v = random_qkv(1, 2, 1, 24, 24, 8, seed=6)
    with pytest.raises(error, match=match):
        sa.sparse_attention(q, k, v, method, causal=causal, **options)


def test_query_and_key_lengths_must_match_the_layout():
    q, k, v = random_qkv(1, 2, 1, 12, 24, 8, seed=7)
    with pytest.raises(ValueError, match="same length"):
        sa.sparse_attention(q, k, v, "neighborhood", causal=False, grid=(4, 6), window=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_spatial_methods_match_the_reference(monkeypatch, dtype):
    from sparse_attn.backends import launch

    monkeypatch.setattr(launch, "allocate", poisoned_allocate)
    grid = (8, 24, 32)
    layout = Layout(grid, tile=(2, 8, 8), text_tokens=128)
    q, k, v = random_qkv(1, 12, 4, layout.seq_len, layout.seq_len, 128, dtype=dtype, device="cuda", seed=8)
    cases = [
        ("neighborhood", dict(window=(3, 7, 7), tile=(2, 8, 8))),  # token rule: flex
        ("neighborhood", dict(window=(2, 24, 24), stride=(2, 8, 8), tile=(2, 8, 8))),  # block-exact: kernels
        ("sliding_tile", dict(tile=(2, 8, 8), window=(3, 3, 3))),
        ("radial", dict()),
        ("vmoba", dict(layer=1, chunk_2d=(4, 4))),
    ]
    for method, options in cases:
        pattern = sa.estimate(q, k, method, causal=False, grid=grid, text_tokens=128, **options)
        expected = sa.block_sparse_attention(
            q.float(), k.float(), v.float(), pattern, causal=False, backend="reference"
        )
        for backend in ("auto", "flex", "triton", "gluon"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend=backend)
            assert relative_error(out, expected) < 1e-2, (method, options, backend)
        if pattern.token_rule is None and pattern.block_q >= 16:  # block-exact: the kernels run it
            ours = ("gluon", "triton") if flash4.installed() else ("gluon", "triton", "flash4")
            assert resolve_backend("auto", q, k, v, pattern, causal=False, return_lse=False) in ours


@pytest.mark.gpu
def test_gpu_block_exact_gradients_match_the_reference():
    grid = (8, 24, 32)
    layout = Layout(grid, text_tokens=128)
    q, k, v = random_qkv(1, 12, 4, layout.seq_len, layout.seq_len, 128, dtype=torch.bfloat16, device="cuda", seed=12)
    options = dict(grid=grid, text_tokens=128, window=(2, 24, 24), stride=(2, 8, 8), tile=(2, 8, 8))
    pattern = sa.estimate(q, k, "neighborhood", causal=False, **options)
    grad = torch.randn_like(q)
    results = []
    for backend, dtype in (("auto", torch.bfloat16), ("reference", torch.float32)):
        inputs = tuple(x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        out = sa.block_sparse_attention(*inputs, pattern, causal=False, backend=backend)
        results.append(torch.autograd.grad(out, inputs, grad.to(dtype)))
    for got, want in zip(*results, strict=True):
        assert relative_error(got, want) < 1e-2


def test_static_patterns_are_built_once_per_options_and_blocks():
    q, k, _ = random_qkv(1, 2, 1, 24, 24, 8, seed=9)
    first = sa.estimate(
        q, k, "sliding_tile", causal=False, grid=(4, 6), tile=(2, 2), window=(1, 3), block_q=8, block_k=8
    )
    again = sa.estimate(
        q, k, "sliding_tile", causal=False, grid=(4, 6), tile=(2, 2), window=(1, 3), block_q=8, block_k=8
    )
    other = sa.estimate(
        q, k, "sliding_tile", causal=False, grid=(4, 6), tile=(2, 2), window=(1, 3), block_q=8, block_k=4
    )
    assert first is again and other is not first


def test_metrics_apply_a_layout_pattern_in_its_order():
    grid, window, tile = (6, 7), (3, 5), (4, 4)
    layout = Layout(grid, tile=tile)
    neighbours = [lambda i, n=n, w=w: natten_neighbours(i, n, w, 1, 1) for n, w in zip(grid, window, strict=True)]
    mask = grid_token_mask(layout, neighbours)
    q, k, v = random_qkv(1, 2, 2, layout.seq_len, layout.seq_len, 16, seed=10)
    pattern = sa.estimate(
        q, k, "neighborhood", causal=False, grid=grid, window=window, tile=tile, block_q=16, block_k=16
    )
    dense = masked_attention(q, k, v, torch.ones_like(mask))
    assert (
        abs(
            sa.metrics.output_error(q, k, v, pattern, causal=False)
            - relative_error(masked_attention(q, k, v, mask), dense)
        )
        < 1e-5
    )
    scores = (q.double() @ k.double().transpose(-1, -2)) * 16**-0.5
    kept = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1) - torch.logsumexp(scores, -1)
    assert abs(sa.metrics.recall(q, k, pattern, causal=False) - float(kept.exp().mean())) < 1e-5


def test_sizes_may_be_lists():
    q, k, v = random_qkv(1, 2, 1, 24, 24, 8, seed=11)
    as_lists = sa.sparse_attention(q, k, v, "neighborhood", causal=False, grid=[4, 6], window=[3, 3], tile=[2, 2])
    as_tuples = sa.sparse_attention(q, k, v, "neighborhood", causal=False, grid=(4, 6), window=(3, 3), tile=(2, 2))
    assert torch.equal(as_lists, as_tuples)


def vmoba_token_mask(q, k, grid, block_shape, threshold, per_query, text=0) -> torch.Tensor:
    """Bool (B, Hq, S, S) in raster order: VMoBA's selection written out pair by pair (float64);
    ``text`` tokens after the video see everything and are seen by everything."""
    full = torch.ones(q.shape[0], q.shape[1], q.shape[2], q.shape[2], dtype=torch.bool)
    q, k = q[:, :, : q.shape[2] - text], k[:, :, : k.shape[2] - text]
    batch, q_heads, seq, _ = q.shape
    group = q_heads // k.shape[1]
    coords = torch.tensor(list(itertools.product(*[range(g) for g in grid])))
    block_grid = [g // b for g, b in zip(grid, block_shape, strict=True)]
    block_of = sum((coords[:, d] // block_shape[d]) * math.prod(block_grid[d + 1 :]) for d in range(3))
    n_blocks = math.prod(block_grid)
    mask = torch.zeros(batch, q_heads, seq, seq, dtype=torch.bool)
    for b, h in itertools.product(range(batch), range(q_heads)):
        keys = k[b, h // group].double()
        means = torch.stack([keys[block_of == c].mean(0) for c in range(n_blocks)])
        gates = q[b, h].double() @ means.T  # (S, C)
        rows = [range(seq)] if not per_query else [[i] for i in range(seq)]
        for group_rows in rows:
            g = gates[list(group_rows)]
            norm = (g - g.min()) / (g.max() - g.min())
            own = torch.zeros_like(norm, dtype=torch.bool)
            for r, i in enumerate(group_rows):
                own[r, block_of[i]] = True
            needed = threshold * float(norm.sum()) - float(norm[own].sum())
            pairs = sorted(
                ((float(norm[r, c]), r, c) for r in range(len(group_rows)) for c in range(n_blocks) if not own[r, c]),
                key=lambda item: -item[0],
            )
            kept, mass = own.clone(), 0.0
            for value, r, c in pairs:
                if mass >= needed:
                    break
                kept[r, c], mass = True, mass + value
            for r, i in enumerate(group_rows):
                mask[b, h, i] = kept[r][block_of]
    full[:, :, :seq, :seq] = mask
    return full


@pytest.mark.parametrize(
    "grid, layer, chunks, selection, text",
    [
        ((6, 4, 6), 0, dict(chunk_1d=2), "head_global", 0),
        ((4, 6, 4), 1, dict(chunk_2d=(3, 2)), "head_global", 5),
        ((4, 6, 4), 2, dict(chunk_3d=(2, 3, 2)), "query_head", 13),
    ],
)
def test_vmoba_equals_its_pairwise_selection(grid, layer, chunks, selection, text):
    seq = math.prod(grid) + text
    q, k, v = random_qkv(2, 4, 2, seq, seq, 16, seed=layer)
    options = dict(grid=grid, layer=layer, threshold=0.3, selection=selection, text_tokens=text, **chunks)
    out, info = sa.sparse_attention(q, k, v, "vmoba", causal=False, return_info=True, **options)
    config = sa.get_method("vmoba").make_config(**options)
    mask = vmoba_token_mask(q, k, grid, config.partition()[1], 0.3, selection == "query_head", text)
    assert relative_error(out, masked_attention(q, k, v, mask)) < 1e-5
    assert info.pattern.block_q == 1 and info.density < 1.0


@pytest.mark.parametrize("threshold", [0.0, 0.01, 0.25, 0.7, 1.0])
@pytest.mark.parametrize("levels", [None, 7])
def test_vmoba_candidate_cut_equals_the_full_sort(threshold, levels):
    """The head-global selection sorts only the values a histogram leaves as candidates; it keeps
    exactly the pairs of one sort over every pair, ties (``levels``: values rounded to a few
    levels) and thresholds at both ends included."""
    from sparse_attn.methods.vmoba import select_pairs, sorted_cut

    gen = torch.Generator().manual_seed(int(threshold * 100) + (levels or 0))
    gates = torch.randn(2, 3, 37, 11, generator=gen)
    if levels is not None:
        gates = (gates * levels / 4).round()
    gates[1, 2] = 0.5  # a constant head: every normalised gate is 0
    own = torch.zeros_like(gates, dtype=torch.bool)
    own[..., torch.arange(37), torch.arange(37) % 11] = True
    kept = select_pairs(gates, own, threshold, per_query=False)
    low, high = gates.amin((-2, -1), keepdim=True), gates.amax((-2, -1), keepdim=True)
    norm = (gates - low) / torch.where(high - low > 1e-6, high - low, torch.ones_like(high))
    needed = threshold * norm.sum((-2, -1), keepdim=True) - (norm * own).sum((-2, -1), keepdim=True)
    flat = norm.masked_fill(own, -1.0).flatten(-2)
    expected = sorted_cut(flat, needed.flatten(-2)).view_as(gates) | own
    assert torch.equal(kept, expected)
    assert (kept.sum() > own.sum()) == (threshold >= 0.25)  # at 0.01 the own blocks already reach it


def test_vmoba_partitions_cycle_over_layers_and_check_divisibility():
    config = sa.get_method("vmoba").make_config
    tiles = [config(grid=(21, 20, 32), layer=layer).partition() for layer in range(4)]
    assert tiles == [("chunk_1d", (3, 20, 32)), ("chunk_2d", (21, 4, 4)), ("chunk_3d", (7, 4, 8)), tiles[0]]
    with pytest.raises(ValueError, match="chunk_2d"):
        config(grid=(21, 45, 80), layer=1)
    with pytest.raises(ValueError, match="text_position='after'"):
        config(grid=(21, 20, 32), text_tokens=8, text_position="before")
    with pytest.raises(ValueError, match="selection"):
        config(selection="global")


def test_tile_order_pattern_runs_on_inputs_permuted_once():
    grid, tile = (5, 9), (4, 4)
    layout = Layout(grid, tile=tile, text_tokens=3)
    q, k, v = random_qkv(1, 2, 1, layout.seq_len, layout.seq_len, 16, seed=13)
    pattern = sa.estimate(
        q, k, "neighborhood", causal=False, grid=grid, window=3, tile=tile, text_tokens=3, block_q=16, block_k=16
    )
    expected = sa.block_sparse_attention(q, k, v, pattern, causal=False)
    tiled = sa.block_sparse_attention(*(layout.permute(x) for x in (q, k, v)), pattern.tile_order(), causal=False)
    assert torch.equal(layout.unpermute(tiled), expected)
    assert pattern.tile_order().token_rule is pattern.token_rule


def test_spatial_methods_are_registered_as_bidirectional():
    bidirectional = {method.name for method in sa.list_methods() if method.bidirectional}
    spatial = {"neighborhood", "sliding_tile", "radial", "vmoba", "svg", "sparse_vdit", "draft"}
    assert bidirectional == spatial | {"psa", "sla"}  # psa / sla: the compensation family
