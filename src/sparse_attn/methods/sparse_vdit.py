"""Sparse-vDiT: per (layer, head) a static pattern — diagonal, multi-diagonal or vertical stripes — from an offline search.

Paper: Pengtao Chen, Xianfang Zeng, Maosen Zhao, Peng Ye, Mingzhu Shen, Wei Cheng, Gang Yu,
Tao Chen, "Sparse-vDiT: Unleashing the Power of Sparse Attention to Accelerate Video
Diffusion Transformers", 2025, arXiv:2506.03065.

Rule. Attention maps of video DiTs fall into three recurring shapes that depend on the layer
and head, not on the input: *diagonal* (local attention around each query), *multi-diagonal*
(the diagonal repeated at every multiple of the frame size: the same spatial position in
every frame) and *vertical stripes* (a few key columns that every query attends to). Each
head is assigned one shape offline; at inference the pattern is static. Here, on the grid
tokens in raster order (``P = H * W`` tokens per frame, ``g`` a token's raster index in the
grid), with half-width ``w = round(width * P)`` tokens:

* ``"diagonal"``: key ``g'`` with ``|g - g'| <= w``;
* ``"multi_diagonal"``: key ``g'`` with ``|g - g' - d * P| <= w`` for some integer ``d``;
* ``"vertical_stripe"``: the keys of the head's stripe blocks (``stripes``: per head, sequence
  positions whose blocks are kept) and the query's own block;
* ``"dense"``: every key (a head no sparse shape serves within the error bound).

At block level, as the paper's kernels compute them: a block pair is kept when any token pair
in it is, and kept blocks are computed whole (no token rule; block-exact, runs on the block
kernels). Text tokens (``text_tokens=``, before or after the video) are global.

Options: ``heads`` (one shape per query head) and ``stripes`` come from :func:`calibrate`,
the offline search: per layer and head, on sampled query rows of captured q/k(/v), it picks
the cheapest shape (fewest kept blocks) whose error against dense attention is within
``error_bound``, else ``"dense"``, and returns the options per layer.

Defaults: without ``heads`` every head uses ``"multi_diagonal"`` — OUR choice, not the paper's
(its shapes come from the search per model): multi-diagonal contains the diagonal and is the
widest of the sparse shapes. ``width=0.125`` (a band of a quarter frame around each
diagonal: multi-diagonal density about 0.25), also ours.

Choices where the paper leaves room (the paper's text could not be read in this session: the
stored copies held its abstract and summaries; its code was not released):

- Head skipping (the paper drops 3-6 % of heads entirely) is not offered: a pattern row is
  never empty, so a skipped head would need a change of output, not of blocks.
- Search cost model: the paper's is hardware-aware; here the cost of a shape is its number of
  kept blocks (the block kernels' time is proportional to it). Error: relative L2 error of
  the sampled rows' outputs (with captured v) or attention weights (without), against dense.
- Stripe positions: per head, the ``stripe_fraction`` of key blocks with the most attention
  mass over the sampled rows (summed over the batch), recorded as their first token.
- Fusing heads of one shape into one kernel launch (the paper's head fusion) is what the
  per-head lists of one pattern already give a block-sparse kernel.
- Lists are per query head, shared by the batch (``kv_counts`` ``(1, Hq, n_q_blocks)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..geometry import num_blocks
from ..layouts import Layout
from ..masked_pattern import MaskedPattern
from ..ops.gqa import grouped_matmul, head_chunks, kv_heads_of
from ..ops.grid_windows import layout_pattern
from ..registry import register_method
from ._spatial import check_grid_option, spatial_layout
from .svg import row_block_masks, sample_grid_rows

__all__ = ["SHAPES", "SparseVditConfig", "calibrate"]

SHAPES = ("diagonal", "multi_diagonal", "vertical_stripe", "dense")
# Cheapest first where the calibration compares shapes of equal cost.
_SEARCH_ORDER = ("diagonal", "vertical_stripe", "multi_diagonal", "dense")


@dataclass(frozen=True)
class SparseVditConfig:
    grid: tuple[int, ...] | None = None
    heads: tuple[str, ...] | None = None
    width: float = 0.125
    stripes: tuple[tuple[int, ...], ...] | None = None
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        grid = check_grid_option(self)
        if grid is not None and len(grid) != 3:
            raise ValueError(f"sparse_vdit needs a video grid (T, H, W), got grid={grid}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not 0 <= self.width <= 1:
            raise ValueError(f"width must be a fraction of a frame in [0, 1], got {self.width!r}")
        if self.heads is not None:
            if isinstance(self.heads, str) or not isinstance(self.heads, Sequence) or not self.heads:
                raise TypeError(f"heads must be a non-empty sequence of shape names {SHAPES}, got {self.heads!r}")
            unknown = sorted({name for name in self.heads if name not in SHAPES})
            if unknown:
                raise ValueError(f"heads has unknown shape(s) {unknown}; the shapes are {SHAPES}")
            object.__setattr__(self, "heads", tuple(self.heads))
        if self.stripes is not None:
            if not isinstance(self.stripes, Sequence) or any(not isinstance(s, Sequence) for s in self.stripes):
                raise TypeError("stripes must be a sequence (one per head) of sequences of token positions")
            for per_head in self.stripes:
                for position in per_head:
                    check_int("stripes positions", position, minimum=0)
            stripes = tuple(tuple(per_head) for per_head in self.stripes)
            if self.heads is None:
                raise ValueError(
                    "stripes= needs heads= (which heads are 'vertical_stripe'); without it no head uses them"
                )
            if len(stripes) != len(self.heads):
                raise ValueError(f"stripes has {len(stripes)} entries but heads has {len(self.heads)}")
            check_int("text_tokens", self.text_tokens, minimum=0)
            if grid is not None:
                tokens = math.prod(grid) + self.text_tokens
                beyond = sorted({p for per_head in stripes for p in per_head if p >= tokens})
                if beyond:
                    raise ValueError(f"stripes positions must be < the layout's {tokens} tokens, got {beyond[:5]}")
            object.__setattr__(self, "stripes", stripes)
        if self.heads is not None and "vertical_stripe" in self.heads and self.stripes is None:
            raise ValueError("heads with 'vertical_stripe' need stripes= (per head, the stripe token positions)")

    def head_shapes(self, q_heads: int) -> tuple[str, ...]:
        if self.heads is None:
            return ("multi_diagonal",) * q_heads
        if len(self.heads) != q_heads:
            raise ValueError(f"heads gives {len(self.heads)} shapes but q has {q_heads} query heads")
        return self.heads


@dataclass(frozen=True)
class _Spans:
    """Per block: first and last grid raster index of its grid tokens (int64 ``(n,)``), whether it holds any."""

    first: torch.Tensor
    last: torch.Tensor
    has_grid: torch.Tensor
    has_text: torch.Tensor


def _spans(layout: Layout, block: int, device) -> _Spans:
    n = num_blocks(layout.seq_len, block)
    start = torch.arange(n, device=device) * block
    stop = torch.clamp(start + block, max=layout.seq_len) - 1
    first = torch.clamp(start, min=layout.grid_start) - layout.grid_start
    last = torch.clamp(stop, max=layout.grid_start + layout.grid_tokens - 1) - layout.grid_start
    return _Spans(first, last, first <= last, layout.is_text(start) | layout.is_text(stop))


def shape_mask(
    shape: str,
    layout: Layout,
    q_spans: _Spans,
    k_spans: _Spans,
    rows: range,
    *,
    half_width: int,
    block_k: int,
    stripes=(),
) -> torch.Tensor:
    """Bool ``(len(rows), n_kv_blocks)``: the blocks ``shape`` keeps for query blocks ``rows`` (module docstring)."""
    qf, ql = q_spans.first[rows.start : rows.stop, None], q_spans.last[rows.start : rows.stop, None]
    kf, kl = k_spans.first[None, :], k_spans.last[None, :]
    both = q_spans.has_grid[rows.start : rows.stop, None] & k_spans.has_grid[None, :]
    gap = torch.clamp(torch.maximum(kf - ql, qf - kl), min=0)  # the smallest |g - g'| of the two blocks
    if shape == "dense":
        keep = torch.ones_like(both)
    elif shape == "diagonal":
        keep = both & (gap <= half_width)
    elif shape == "multi_diagonal":
        # The block pair holds every difference g - g' in [low, high]; some d * P lies within w of it when
        # floor((high + w) / P) >= ceil((low - w) / P).
        frame = layout.grid[1] * layout.grid[2]
        low, high = qf - kl, ql - kf
        top = torch.div(high + half_width, frame, rounding_mode="floor")
        bottom = -torch.div(half_width - low, frame, rounding_mode="floor")
        keep = both & (top >= bottom)
    else:  # vertical_stripe: the stripe blocks and the query's own block
        keep = both & (gap == 0)
        n_kv = keep.shape[1]
        blocks = sorted({p // block_k for p in stripes if p // block_k < n_kv})
        keep[:, torch.tensor(blocks, dtype=torch.int64, device=keep.device)] = True
    return keep | q_spans.has_text[rows.start : rows.stop, None] | k_spans.has_text[None, :]


def build_pattern(
    shapes: Sequence[str], stripes, layout: Layout, *, width: float, block_q: int, block_k: int, device
) -> MaskedPattern:
    """The per-head pattern (``(1, len(shapes), n_q_blocks, max_kv)``) of the given shapes over ``layout``."""
    half_width = max(0, math.floor(width * layout.grid[1] * layout.grid[2] + 0.5))
    q_spans, k_spans = _spans(layout, block_q, device), _spans(layout, block_k, device)
    stripes = stripes if stripes is not None else ((),) * len(shapes)

    def mask_rows(rows: range) -> torch.Tensor:
        cache: dict[tuple, torch.Tensor] = {}
        masks = []
        for shape, stripe in zip(shapes, stripes, strict=True):
            key = (shape, stripe if shape == "vertical_stripe" else ())
            if key not in cache:
                cache[key] = shape_mask(
                    shape, layout, q_spans, k_spans, rows, half_width=half_width, block_k=block_k, stripes=stripe
                )
            masks.append(cache[key])
        return torch.stack(masks)[None]

    pattern = layout_pattern(
        mask_rows,
        layout,
        block_q=block_q,
        block_k=block_k,
        device=device,
        row_elements=4 * len(shapes) * num_blocks(layout.seq_len, block_k),
        heads=len(shapes),
    )
    return MaskedPattern.over_layout(pattern, layout)


@register_method(
    "sparse_vdit",
    config=SparseVditConfig,
    paper="Chen et al. 2025, Sparse-vDiT: Unleashing the Power of Sparse Attention to Accelerate Video DiTs (arXiv:2506.03065)",
    summary="static per head: diagonal, multi-diagonal (every frame offset) or vertical stripes, from calibrate()",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: SparseVditConfig, *, causal: bool, block_q: int, block_k: int
) -> MaskedPattern:
    """Block-exact pattern in raster order; lists per query head, shared by the batch."""
    layout = spatial_layout("sparse_vdit", q, k, config, causal=causal, tile=None)
    shapes = config.head_shapes(q.shape[1])
    return build_pattern(
        shapes, config.stripes, layout, width=config.width, block_q=block_q, block_k=block_k, device=q.device
    )


def _sampled_outputs(q_rows, k, v, row_masks, block_k: int, scale: float) -> list[torch.Tensor]:
    """Per entry of ``row_masks`` (bool ``(B or 1, Hq, R, n_kv)``, ``None`` = dense): float32 outputs
    ``(B, Hq, R, D)`` of the sampled rows (attention weights ``(B, Hq, R, S)`` when ``v`` is None)."""
    group = q_rows.shape[1] // k.shape[1]
    key_block = torch.arange(k.shape[2], device=k.device) // block_k
    results = [[] for _ in row_masks]
    for heads in head_chunks(q_rows.shape[1], group, 1):
        logits = grouped_matmul(
            q_rows[:, heads.start : heads.stop].float() * scale, k[:, kv_heads_of(heads, group)].float()
        )
        for index, blocks in enumerate(row_masks):
            if blocks is not None:
                kept = blocks[:, heads.start : heads.stop][..., key_block]
                chunk = logits.masked_fill(~kept, float("-inf"))
            else:
                chunk = logits
            weights = torch.softmax(chunk, dim=-1)
            if v is not None:
                weights = torch.matmul(weights, v[:, kv_heads_of(heads, group)].float())
            results[index].append(weights)
    return [torch.cat(parts, dim=1) for parts in results]


def calibrate(
    captures: Mapping[int, Sequence[torch.Tensor]],
    *,
    grid: tuple[int, int, int],
    text_tokens: int = 0,
    text_position: str = "after",
    error_bound: float = 0.05,
    width: float = 0.125,
    stripe_fraction: float = 0.1,
    sample_rows: int = 64,
    block: int = 128,
    seed: int = 0,
) -> dict[int, dict]:
    """The offline search: per layer, the ``sparse_vdit`` options (``heads``, ``stripes``, ``width``) for its captures.

    ``captures`` maps a layer to its ``(q, k)`` or ``(q, k, v)`` (q ``(B, Hq, S, D)``, k/v ``(B, Hkv, S, D)``,
    one video of ``grid`` plus ``text_tokens`` text tokens). Per head: ``sample_rows`` grid rows
    (seeded by ``seed``) give exact dense outputs (weights without v); the stripe blocks are
    the ``stripe_fraction`` of ``block``-token key blocks with the most sampled attention mass;
    each shape is scored by the relative L2 error of its sampled rows against dense, and the
    head gets the cheapest shape (fewest kept blocks at ``block``) whose error is at most
    ``error_bound``, else ``"dense"``. Use as ``sa.sparse_attention(..., method="sparse_vdit",
    grid=grid, text_tokens=text_tokens, **result[layer])``.
    """
    check_fraction("error_bound", error_bound)
    check_fraction("stripe_fraction", stripe_fraction)
    check_int("sample_rows", sample_rows)
    check_int("block", block)
    if not captures:
        raise ValueError("captures must hold at least one layer's (q, k)")
    config = SparseVditConfig(grid=grid, width=width, text_tokens=text_tokens, text_position=text_position)
    result = {}
    for layer, tensors in captures.items():
        q, k = tensors[0], tensors[1]
        v = tensors[2] if len(tensors) > 2 else None
        layout = spatial_layout("sparse_vdit", q, k, config, causal=False, tile=None)
        q_heads, scale = q.shape[1], q.shape[-1] ** -0.5
        rows = sample_grid_rows(layout, sample_rows, seed, q.device)
        q_rows = q[:, :, rows]
        (dense_weights,) = _sampled_outputs(q_rows, k, None, [None], block, scale)
        n_kv = num_blocks(layout.seq_len, block)
        mass = torch.zeros((q_heads, n_kv), dtype=torch.float32, device=q.device)
        key_block = (torch.arange(layout.seq_len, device=q.device) // block).expand(q_heads, -1)
        mass.scatter_add_(1, key_block, dense_weights.sum(dim=(0, 2)))
        n_stripes = max(1, math.ceil(stripe_fraction * n_kv))
        stripes = tuple(
            tuple(int(b) * block for b in sorted(mass[h].topk(min(n_stripes, n_kv)).indices.tolist()))
            for h in range(q_heads)
        )
        reference = dense_weights if v is None else _sampled_outputs(q_rows, k, v, [None], block, scale)[0]
        errors, costs = {}, {}
        for shape in _SEARCH_ORDER:
            pattern = build_pattern(
                (shape,) * q_heads, stripes, layout, width=width, block_q=block, block_k=block, device=q.device
            )
            (out,) = _sampled_outputs(q_rows, k, v, [row_block_masks(pattern, rows)], block, scale)
            difference = torch.linalg.vector_norm((out - reference).flatten(2).transpose(0, 1).flatten(1), dim=-1)
            errors[shape] = difference / torch.linalg.vector_norm(reference.transpose(0, 1).flatten(1), dim=-1)
            costs[shape] = pattern.kv_counts[0].sum(-1).float()  # kept blocks per head
        heads = []
        for h in range(q_heads):
            fitting = [s for s in _SEARCH_ORDER if s == "dense" or float(errors[s][h]) <= error_bound]
            heads.append(min(fitting, key=lambda s: (float(costs[s][h]), _SEARCH_ORDER.index(s))))
        result[layer] = {"heads": tuple(heads), "stripes": stripes, "width": width}
    return result
