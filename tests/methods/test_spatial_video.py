"""Video methods svg, sparse_vdit and draft against brute-force references of their rules.

Each reference works token by token in the caller's (raster) order from the method's stated
rule; block patterns are then the blocks (in the pattern's layout order) holding an allowed
token pair, and outputs are float64 dense attention under the kept blocks.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from helpers import poisoned_allocate, random_qkv, relative_error

import sparse_attn as sa
from sparse_attn.backends import resolve_backend
from sparse_attn.layouts import Layout
from sparse_attn.methods.sparse_vdit import calibrate
from sparse_attn.methods.svg import sample_grid_rows


def grid_coords(layout: Layout) -> torch.Tensor:
    """int64 (S, rank) raster coordinates of every position of the caller's order; -1 rows for text."""
    coords = torch.full((layout.seq_len, layout.rank), -1, dtype=torch.int64)
    start = layout.grid_start
    coords[start : start + layout.grid_tokens] = torch.tensor(list(itertools.product(*[range(g) for g in layout.grid])))
    return coords


def blocks_of(token_mask: torch.Tensor, layout: Layout, block: int) -> torch.Tensor:
    """Bool (..., n, n): blocks of the layout's order holding an allowed pair of ``token_mask`` (raster order)."""
    order = layout.order()
    permuted = token_mask[..., order, :][..., order]
    n = -(-layout.seq_len // block)
    padded = torch.zeros((*permuted.shape[:-2], n * block, n * block), dtype=torch.bool)
    padded[..., : layout.seq_len, : layout.seq_len] = permuted
    return padded.unflatten(-1, (n, block)).unflatten(-3, (n, block)).any(-1).any(-2)


def kept_tokens(pattern, layout: Layout) -> torch.Tensor:
    """Bool (B, H, S, S) in the caller's order: token pairs inside each head's kept blocks."""
    blocks = pattern.to_mask()
    tokens = blocks.repeat_interleave(pattern.block_q, -2).repeat_interleave(pattern.block_k, -1)
    tokens = tokens[..., : pattern.seq_q, : pattern.seq_k]
    inverse = layout.inverse()
    return tokens[..., inverse, :][..., inverse]


def masked_attention(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def with_text(grid_rule: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(..., S, S): the grid rule among grid tokens, text rows and columns all True."""
    mask = torch.ones((*grid_rule.shape[:-2], layout.seq_len, layout.seq_len), dtype=torch.bool)
    start, n = layout.grid_start, layout.grid_tokens
    mask[..., start : start + n, start : start + n] = grid_rule
    return mask


def window(count: int, width: int) -> torch.Tensor:
    """Written out: index j is among the ``width`` indices around i (shifted inward at the ends)."""
    rule = torch.zeros(count, count, dtype=torch.bool)
    for i in range(count):
        start = min(max(i - (width - 1) // 2, 0), count - width)
        rule[i, start : start + width] = True
    return rule


# --- draft -------------------------------------------------------------------------------------


def draft_region_mask(q, k, layout: Layout, pool, sparsity: float, selection: str) -> torch.Tensor:
    """Bool (B, Hq, S, S) raster order: region pairs selected from the float64 draft map."""
    coords = grid_coords(layout)[layout.grid_start : layout.grid_start + layout.grid_tokens]
    spatial = coords[:, -2:] // torch.tensor(pool)
    per_frame = [-(-g // p) for g, p in zip(layout.grid[-2:], pool, strict=True)]
    region = spatial[:, 0] * per_frame[1] + spatial[:, 1]
    if layout.rank == 3:
        region = region + coords[:, 0] * math.prod(per_frame)
    regions = int(region.max()) + 1
    start = layout.grid_start
    group = q.shape[1] // k.shape[1]
    batch, heads = q.shape[:2]
    grid_mask = torch.zeros(batch, heads, layout.grid_tokens, layout.grid_tokens, dtype=torch.bool)
    for b, h in itertools.product(range(batch), range(heads)):
        qs = q[b, h, start : start + layout.grid_tokens].double()
        ks = k[b, h // group, start : start + layout.grid_tokens].double()
        pq = torch.stack([qs[region == r].mean(0) for r in range(regions)])
        pk = torch.stack([ks[region == r].mean(0) for r in range(regions)])
        draft = torch.softmax(pq @ pk.T / math.sqrt(q.shape[-1]), -1)
        chosen = torch.zeros(regions, regions, dtype=torch.bool)
        if selection == "row":
            keep = max(1, math.ceil((1 - sparsity) * regions))
            for r in range(regions):
                chosen[r, draft[r].argsort(descending=True)[:keep]] = True
        else:
            keep = max(1, regions * regions - math.floor(sparsity * regions * regions))
            flat = chosen.view(-1)
            flat[draft.flatten().argsort(descending=True)[:keep]] = True
        chosen[torch.arange(regions), draft.argmax(-1)] = True
        grid_mask[b, h] = chosen[region[:, None], region[None, :]]
    return with_text(grid_mask, layout)


@pytest.mark.parametrize(
    "grid, pool, text, position, block, selection, sparsity",
    [
        ((3, 4, 8), (2, 4), 5, "after", 8, "head", 0.8),  # regions are blocks: exact
        ((2, 6, 8), (2, 4), 7, "before", 8, "row", 0.6),
        ((3, 5, 6), (2, 4), 3, "after", 8, "head", 0.7),  # short regions: blocks straddle them
        ((6, 10), (4, 4), 0, "after", 16, "head", 0.5),  # an image
    ],
)
def test_draft_blocks_are_the_selected_regions(grid, pool, text, position, block, selection, sparsity):
    layout = Layout(grid, tile=(1, *pool) if len(grid) == 3 else pool, text_tokens=text, text_position=position)
    q, k, v = random_qkv(2, 6, 3, layout.seq_len, layout.seq_len, 16, seed=len(grid) + block)
    options = dict(grid=grid, pool=pool, sparsity=sparsity, selection=selection, text_tokens=text)
    out, info = sa.sparse_attention(
        q,
        k,
        v,
        "draft",
        causal=False,
        text_position=position,
        block_q=block,
        block_k=block,
        return_info=True,
        **options,
    )
    pattern = info.pattern
    tokens = draft_region_mask(q, k, layout, pool, sparsity, selection)
    assert torch.equal(pattern.to_mask(), blocks_of(tokens, layout, block))
    aligned = layout.tiles_divide_grid and math.prod(pool) == block and layout.grid_start % block == 0
    if aligned:  # each block one region: exactly the selection
        assert torch.equal(kept_tokens(pattern, layout), tokens)
    assert pattern.token_rule is None and info.density < 1.0
    assert relative_error(out, masked_attention(q, k, v, kept_tokens(pattern, layout))) < 1e-5


# --- svg ---------------------------------------------------------------------------------------


def svg_class_masks(layout: Layout, patch, density: float, sink: int) -> dict[str, torch.Tensor]:
    """Bool (S, S) raster order per head class: the frame window and the patch window (plus sink frames)."""
    coords = grid_coords(layout)[layout.grid_start : layout.grid_start + layout.grid_tokens]
    frames = layout.grid[0]
    per_row = -(-layout.grid[2] // patch[1])
    patches = per_row * -(-layout.grid[1] // patch[0])
    patch_of = (coords[:, 1] // patch[0]) * per_row + coords[:, 2] // patch[1]
    frame = coords[:, 0]
    frame_rule = window(frames, max(1, math.floor(density * frames + 0.5)))
    patch_rule = window(patches, max(1, math.floor(density * patches + 0.5)))
    sink_keys = (frame < sink)[None, :]
    return {
        "spatial": with_text(frame_rule[frame[:, None], frame[None, :]] | sink_keys, layout),
        "temporal": with_text(patch_rule[patch_of[:, None], patch_of[None, :]] | sink_keys, layout),
    }


def svg_reference(q, k, layout, patch, density, sink, block, sample_rows, seed):
    """Per (batch, head): the class with the lower sampled-row weight error, and the (B, H, n, n) block masks."""
    class_blocks = {
        name: blocks_of(mask, layout, block) for name, mask in svg_class_masks(layout, patch, density, sink).items()
    }
    rows = sample_grid_rows(layout, sample_rows, seed, "cpu")  # positions of the tile order
    raster_rows = layout.order()[rows]
    group = q.shape[1] // k.shape[1]
    scores = (q.double()[:, :, raster_rows] @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * q.shape[
        -1
    ] ** -0.5
    dense = torch.softmax(scores, -1)
    errors = {}
    for name, blocks in class_blocks.items():
        keys = blocks[rows // block].repeat_interleave(block, -1)[:, : layout.seq_len][:, layout.inverse()]
        masked = torch.softmax(scores.masked_fill(~keys, float("-inf")), -1)
        errors[name] = (masked - dense).square().mean(dim=(-2, -1))
    temporal = errors["temporal"] < errors["spatial"]
    expected = torch.where(temporal[..., None, None], class_blocks["temporal"], class_blocks["spatial"])
    return temporal, expected


@pytest.mark.parametrize(
    "grid, patch, density, sink, text, position, block",
    [
        ((4, 4, 8), (2, 4), 0.5, 0, 5, "after", 8),  # cells are blocks
        ((3, 6, 8), (2, 4), 0.4, 1, 6, "before", 8),
        ((4, 5, 6), (2, 4), 0.5, 0, 3, "after", 8),  # short patches: blocks straddle cells
    ],
)
def test_svg_heads_take_the_lower_error_mask(grid, patch, density, sink, text, position, block):
    layout = Layout(grid, tile=(grid[0], *patch), text_tokens=text, text_position=position)
    q, k, v = random_qkv(2, 6, 3, layout.seq_len, layout.seq_len, 16, seed=grid[0] + text)
    options = dict(grid=grid, patch=patch, density=density, sink_frames=sink, text_tokens=text, sample_rows=20)
    out, info = sa.sparse_attention(
        q, k, v, "svg", causal=False, text_position=position, block_q=block, block_k=block, return_info=True, **options
    )
    temporal, expected = svg_reference(q, k, layout, patch, density, sink, block, 20, 0)
    pattern = info.pattern
    assert torch.equal(pattern.to_mask(), expected)
    labels = pattern.cached_plan(sa.registry.HEAD_METHODS)
    assert labels == tuple(tuple("temporal" if t else "spatial" for t in row) for row in temporal.tolist())
    assert pattern.token_rule is None and info.density < 1.0
    assert relative_error(out, masked_attention(q, k, v, kept_tokens(pattern, layout))) < 1e-5


def planted_video_heads(grid, dim: int = 32, seed: int = 0):
    """q = k for two heads over one KV head each: head 0 matches the same spatial position in every
    frame (temporal), head 1 matches every position of its own frame (spatial)."""
    generator = torch.Generator().manual_seed(seed)
    frames, height, width = grid
    positions = height * width
    position_code = torch.randn(positions, dim, generator=generator)
    frame_code = torch.randn(frames, dim, generator=generator)
    noise = 0.05 * torch.randn(2, frames * positions, dim, generator=generator)
    temporal = position_code.repeat(frames, 1) * 2.0 + noise[0]
    spatial = frame_code.repeat_interleave(positions, 0) * 2.0 + noise[1]
    x = torch.stack([temporal, spatial])[None]
    return x, x.clone(), torch.randn(1, 2, frames * positions, dim, generator=generator)


def test_svg_classifies_planted_temporal_and_spatial_heads():
    grid = (4, 8, 8)
    q, k, v = planted_video_heads(grid)
    pattern = sa.estimate(q, k, "svg", causal=False, grid=grid, patch=(4, 4), density=0.25, block_q=16, block_k=16)
    assert pattern.cached_plan(sa.registry.HEAD_METHODS) == (("temporal", "spatial"),)


# --- sparse_vdit -------------------------------------------------------------------------------


def vdit_token_mask(layout: Layout, shape: str, width: float, block: int, stripes=()) -> torch.Tensor:
    """Bool (S, S) raster order of one head's shape (vertical stripes at block level, as the rule states)."""
    frame = layout.grid[1] * layout.grid[2]
    w = math.floor(width * frame + 0.5)
    g = torch.arange(layout.grid_tokens)
    diff = g[:, None] - g[None, :]
    if shape == "diagonal":
        rule = diff.abs() <= w
    elif shape == "multi_diagonal":
        rule = torch.zeros_like(diff, dtype=torch.bool)
        for d in range(-layout.grid[0], layout.grid[0] + 1):
            rule |= (diff - d * frame).abs() <= w
    elif shape == "dense":
        rule = torch.ones_like(diff, dtype=torch.bool)
    else:
        position = torch.arange(layout.seq_len)
        same_block = (position[:, None] // block) == (position[None, :] // block)
        stripe = torch.zeros(layout.seq_len, dtype=torch.bool)
        for p in stripes:
            stripe |= position // block == p // block
        full = same_block | stripe[None, :]
        start, n = layout.grid_start, layout.grid_tokens
        return with_text(full[start : start + n, start : start + n], layout)
    return with_text(rule, layout)


@pytest.mark.parametrize(
    "grid, width, text, position, block",
    [((4, 3, 5), 0.2, 6, "after", 8), ((3, 4, 4), 0.125, 5, "before", 16), ((5, 2, 3), 0.0, 0, "after", 4)],
)
def test_sparse_vdit_shapes_equal_their_token_rules(grid, width, text, position, block):
    layout = Layout(grid, text_tokens=text, text_position=position)
    heads = ("diagonal", "multi_diagonal", "vertical_stripe", "dense", "vertical_stripe")
    stripes = ((), (), (0, layout.seq_len - 1), (), (block * 2 + 1,))
    q, k, v = random_qkv(2, 5, 5, layout.seq_len, layout.seq_len, 16, seed=grid[0])
    options = dict(grid=grid, width=width, heads=heads, stripes=stripes, text_tokens=text, text_position=position)
    out, info = sa.sparse_attention(
        q, k, v, "sparse_vdit", causal=False, block_q=block, block_k=block, return_info=True, **options
    )
    expected = torch.stack(
        [
            blocks_of(vdit_token_mask(layout, s, width, block, st), layout, block)
            for s, st in zip(heads, stripes, strict=True)
        ]
    )
    pattern = info.pattern
    assert torch.equal(pattern.to_mask()[0], expected)
    assert pattern.token_rule is None and pattern.kv_counts.shape[:2] == (1, 5)
    assert relative_error(out, masked_attention(q, k, v, kept_tokens(pattern, layout))) < 1e-5
    default = sa.estimate(
        q,
        k,
        "sparse_vdit",
        causal=False,
        grid=grid,
        width=width,
        text_tokens=text,
        text_position=position,
        block_q=block,
        block_k=block,
    )
    assert torch.equal(default.to_mask()[0], expected[1:2].expand(5, -1, -1))  # every head multi-diagonal


def test_sparse_vdit_calibration_picks_the_planted_shapes():
    # Frames of 128 tokens, 16-token blocks: the diagonal keeps 3 of 32 key blocks per query block,
    # multi-diagonal 3 of every frame's 8.
    grid = (4, 8, 16)
    frames, positions, dim = grid[0], grid[1] * grid[2], 32
    generator = torch.Generator().manual_seed(3)
    tokens = frames * positions
    smooth = torch.nn.functional.avg_pool1d(torch.randn(1, dim, tokens + 8, generator=generator), 9, stride=1)
    local = smooth[0].T * 6.0  # features smooth along the raster order: attention within a few tokens
    periodic = torch.randn(positions, dim, generator=generator).repeat(frames, 1) * 3.0  # same position, all frames
    flat = 0.01 * torch.randn(tokens, dim, generator=generator)  # uniform attention: no sparse shape fits
    q = torch.stack([local, periodic, flat])[None]
    v = torch.randn(1, 3, tokens, dim, generator=generator)
    result = calibrate({0: (q, q.clone(), v)}, grid=grid, width=0.125, error_bound=0.1, block=16, sample_rows=32)
    assert result[0]["heads"] == ("diagonal", "multi_diagonal", "dense")
    assert all(len(stripes) == 4 for stripes in result[0]["stripes"])  # 10 % of 32 key blocks
    out = sa.sparse_attention(q, q, v, "sparse_vdit", causal=False, grid=grid, block_q=16, block_k=16, **result[0])
    assert relative_error(out, masked_attention(q, q, v, torch.ones(tokens, tokens, dtype=torch.bool))) < 0.1


# --- shared: dense limits, bad input, registration -------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [
        ("draft", dict(pool=(2, 4), sparsity=0.0)),
        ("svg", dict(patch=(2, 4), density=1.0)),
        ("sparse_vdit", dict(width=1.0)),
        ("sparse_vdit", dict(heads=("dense",) * 4)),
    ],
)
def test_keep_everything_settings_equal_dense(method, options):
    grid, text = (3, 4, 8), 4
    seq = math.prod(grid) + text
    q, k, v = random_qkv(2, 4, 2, seq, seq, 16, seed=5)
    out, info = sa.sparse_attention(
        q, k, v, method, causal=False, grid=grid, text_tokens=text, block_q=8, block_k=8, return_info=True, **options
    )
    assert info.density == 1.0
    dense = sa.sparse_attention(q, k, v, "dense", causal=False, backend="reference")
    assert relative_error(out, dense) < 1e-5
    reference = sa.block_sparse_attention(q, k, v, info.pattern, causal=False, backend="reference")
    assert relative_error(out, reference) < 1e-5


@pytest.mark.parametrize(
    "method, options, causal, match",
    [
        ("svg", dict(grid=(2, 3, 4)), True, "causal=False"),
        ("draft", dict(grid=(2, 3, 4)), True, "causal=False"),
        ("sparse_vdit", dict(grid=(2, 3, 4)), True, "causal=False"),
        ("svg", dict(grid=(2, 3, 5)), False, "product 30"),
        ("draft", dict(grid=(3, 3, 3)), False, "product 27"),
        ("sparse_vdit", dict(grid=(2, 3, 5)), False, "product 30"),
        ("svg", dict(grid=(4, 6)), False, "\\(T, H, W\\)"),
        ("sparse_vdit", dict(grid=(4, 6)), False, "\\(T, H, W\\)"),
        ("svg", dict(grid=(2, 3, 4), density=0.0), False, "density"),
        ("draft", dict(grid=(2, 3, 4), sparsity=1.0), False, "sparsity"),
        ("draft", dict(grid=(2, 3, 4), selection="global"), False, "selection"),
        ("sparse_vdit", dict(grid=(2, 3, 4), heads=("diagonal", "slash")), False, "unknown shape"),
        ("sparse_vdit", dict(grid=(2, 3, 4), heads=("diagonal",) * 3), False, "2 query heads"),
        ("sparse_vdit", dict(grid=(2, 3, 4), heads=("vertical_stripe",) * 2), False, "stripes="),
    ],
)
def test_bad_video_calls_raise_naming_the_option(method, options, causal, match):
    q, k, v = random_qkv(1, 2, 1, 24, 24, 8, seed=6)
    with pytest.raises(ValueError, match=match):
        sa.sparse_attention(q, k, v, method, causal=causal, **options)


def test_video_methods_are_registered_as_bidirectional():
    bidirectional = {method.name for method in sa.list_methods() if method.bidirectional}
    assert {"svg", "sparse_vdit", "draft"} <= bidirectional
    for name in ("svg", "sparse_vdit", "draft"):
        assert "arXiv:" in sa.get_method(name).paper


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_video_methods_match_the_reference(monkeypatch, dtype):
    from sparse_attn.backends import launch

    monkeypatch.setattr(launch, "allocate", poisoned_allocate)
    grid = (8, 24, 32)
    layout = Layout(grid, text_tokens=128)
    q, k, v = random_qkv(1, 12, 4, layout.seq_len, layout.seq_len, 128, dtype=dtype, device="cuda", seed=8)
    for method in ("svg", "sparse_vdit", "draft"):
        pattern = sa.estimate(q, k, method, causal=False, grid=grid, text_tokens=128)
        assert pattern.token_rule is None
        expected = sa.block_sparse_attention(
            q.float(), k.float(), v.float(), pattern, causal=False, backend="reference"
        )
        for backend in ("auto", "flex", "triton", "gluon"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend=backend)
            assert relative_error(out, expected) < 1e-2, (method, backend)
        assert resolve_backend("auto", q, k, v, pattern, causal=False, return_lse=False) in ("gluon", "triton")
