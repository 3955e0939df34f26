"""Radial Attention: a static video mask whose spatial window shrinks as the temporal distance grows.

Paper: Xingyang Li, Muyang Li, Tianle Cai, Haocheng Xi, Shuo Yang, Yujun Lin, Lvmin Zhang,
Songlin Yang, Jinbo Hu, Kelly Peng, Maneesh Agrawala, Ion Stoica, Kurt Keutzer, Song Han,
"Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation",
2025, arXiv:2506.19852.

Rule (token level; tokens in raster order, frame by frame: ``grid=(T, H, W)``, ``P = H * W``
tokens per frame, a token is (frame ``f``, in-frame index ``s``)). A query ``(f, s)`` sees the
key ``(f', s')`` when

* ``f' < sink_frames`` (the first frame is an attention sink, seen whole by every query), or
* with ``d = |f - f'|``, band ``b = bit_length(d)`` (``0`` for ``d = 0``, ``1`` for ``d = 1``,
  ``2`` for ``d`` in 2..3, ``3`` for 4..7, ...) and width ``w = 2^bit_length(P) * decay_factor / 2^b``:
  if ``w >= block_k``, ``|s - s'| <= w`` (the spatial window halves with each doubling of the
  temporal distance, so compute density decays exponentially: O(n log n) in total); if
  ``w < block_k`` (a window narrower than one block), ``|s - s'| <= block_k`` but only for frame
  distances that are multiples of ``floor(block_k / w)`` (frames are sub-sampled instead of the
  window shrinking further).

At block granularity, as the paper computes it: a block pair is kept when any of its token
pairs is, and kept blocks are computed whole (no token rule), so the pattern is block-exact
and runs on the block kernels. Text tokens (``text_tokens=``, before or after the video) attend
to everything and are attended by everything.

Defaults: ``decay_factor=1.0`` (the value the released inference scripts pass),
``sink_frames=1``.

Choices where the paper leaves room (unverified against the paper's text in this session: the
stored copies reachable held its abstract; the rule above follows the released mask code's
structure, written anew):

- Block granularity: the released code keeps a block when most of its columns are dense
  enough (a threshold heuristic); here a block is kept when any token pair in it is kept, a
  superset of the token mask that is easy to state and test.
- The released code special-cases the frame distance 1 per model (dense for HunyuanVideo,
  half width for Wan); here distance 1 follows the formula (``w = 2^bit_length(P) / 2``, at
  least half a frame), and distance 0 is the whole frame.
- The block-width threshold is the API's ``block_k`` (the paper's kernel block, 128).
- No tile permutation: the window is a band in raster order within frame pairs, as in the
  paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..geometry import num_blocks
from ..layouts import Layout
from ..masked_pattern import MaskedPattern
from ..ops.grid_windows import layout_pattern
from ..registry import register_method
from ._spatial import check_grid_option, spatial_layout, static_pattern


@dataclass(frozen=True)
class RadialConfig:
    grid: tuple[int, ...] | None = None
    decay_factor: float = 1.0
    sink_frames: int = 1
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        grid = check_grid_option(self)
        if grid is not None and len(grid) != 3:
            raise ValueError(f"radial needs a video grid (T, H, W), got grid={grid}")
        if isinstance(self.decay_factor, bool) or not isinstance(self.decay_factor, (int, float)):
            raise TypeError(f"decay_factor must be a float, got {type(self.decay_factor).__name__}")
        if not self.decay_factor > 0 or self.decay_factor == float("inf"):
            raise ValueError(f"decay_factor must be a positive finite float, got {self.decay_factor}")
        check_int("sink_frames", self.sink_frames, minimum=0)
        check_int("text_tokens", self.text_tokens, minimum=0)


def frame_rule(frames: int, frame_tokens: int, decay_factor: float, block_k: int, device=None):
    """Per frame distance ``d`` in ``[0, frames)``: the spatial half-width (float64) and whether the pair of
    frames is kept at all (bool), as in the module docstring."""
    distance = torch.arange(frames, device=device)
    band = torch.floor(torch.log2(distance.clamp(min=1).double())) + 1
    band = torch.where(distance == 0, 0.0, band)
    width = (2.0 ** frame_tokens.bit_length()) * decay_factor / 2.0**band
    narrow = width < block_k
    every = torch.floor(block_k / width).clamp(min=1).long()
    kept = ~narrow | (distance % every == 0)
    return torch.where(narrow, float(block_k), width), kept


def _segments(layout: Layout, block: int, device):
    """Per block, its grid tokens cut at frame edges: frame, first and last in-frame index (int64
    ``(n, m)``, ``m`` segments at most; unused segments have first > last), and whether it holds text."""
    frame_tokens = layout.grid[1] * layout.grid[2]
    n = num_blocks(layout.seq_len, block)
    start = torch.arange(n, device=device) * block
    stop = torch.clamp(start + block, max=layout.seq_len) - 1
    grid_first = torch.clamp(start, min=layout.grid_start) - layout.grid_start
    grid_last = torch.clamp(stop, max=layout.grid_start + layout.grid_tokens - 1) - layout.grid_start
    has_grid = grid_first <= grid_last
    has_text = layout.is_text(start) | layout.is_text(stop)
    m = -(-block // frame_tokens) + 1
    frame = (grid_first // frame_tokens)[:, None] + torch.arange(m, device=device)
    first = torch.where(frame == (grid_first // frame_tokens)[:, None], (grid_first % frame_tokens)[:, None], 0)
    last = torch.where(
        frame == (grid_last // frame_tokens)[:, None], (grid_last % frame_tokens)[:, None], frame_tokens - 1
    )
    valid = has_grid[:, None] & (frame <= (grid_last // frame_tokens)[:, None])
    last = torch.where(valid, last, -1)
    return frame, first, last, has_text


@register_method(
    "radial",
    config=RadialConfig,
    paper="Li et al. 2025, Radial Attention: O(n log n) Sparse Attention with Energy Decay (arXiv:2506.19852)",
    summary="static video mask: spatial band halves per doubling of frame distance, frame-0 sink; block granular",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: RadialConfig, *, causal: bool, block_q: int, block_k: int
) -> MaskedPattern:
    """Non-causal block-exact pattern in raster order; one list for every batch and head."""
    layout = spatial_layout("radial", q, k, config, causal=causal, tile=None)
    return static_pattern(_build, config, layout, block_q, block_k, q.device)


def _build(config: RadialConfig, layout: Layout, *, block_q: int, block_k: int, device) -> MaskedPattern:
    frames, frame_tokens = layout.grid[0], layout.grid[1] * layout.grid[2]
    width, frames_kept = frame_rule(frames, frame_tokens, config.decay_factor, block_k, device)
    q_frame, q_first, q_last, q_text = _segments(layout, block_q, device)
    k_frame, k_first, k_last, k_text = _segments(layout, block_k, device)
    k_valid = k_first <= k_last

    def mask_rows(rows: range) -> torch.Tensor:
        qf, qa, qb = (x[rows.start : rows.stop, None, :, None] for x in (q_frame, q_first, q_last))
        kf, ka, kb = (x[None, :, None, :] for x in (k_frame, k_first, k_last))
        valid = (qa <= qb) & k_valid[None, :, None, :]
        distance = (qf - kf).abs().clamp(max=frames - 1)
        gap = torch.clamp(torch.maximum(ka - qb, qa - kb), min=0)
        near = (gap <= width[distance]) & frames_kept[distance]
        keep = (valid & ((kf < config.sink_frames) | near)).any(-1).any(-1)
        return keep | q_text[rows.start : rows.stop, None] | k_text[None, :]

    row_elements = 8 * k_frame.shape[0] * q_frame.shape[1] * k_frame.shape[1]
    pattern = layout_pattern(
        mask_rows, layout, block_q=block_q, block_k=block_k, device=device, row_elements=row_elements
    )
    return MaskedPattern.over_layout(pattern, layout)
