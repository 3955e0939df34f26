"""Tuning choices of the Triton and Gluon kernels, and the one way to override them.

Built-in policy:

* Triton tiles: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates per head_dim, one list
  for 16-bit inputs (the head_dim 128 list holds the winners of ``benchmarks/kernel_configs.py``
  on Hopper) and one for float32 (exact IEEE products; small tiles to fit shared memory). Only
  tiles that divide the pattern's blocks are tried.
* Triton load modes, the other autotune axis: ``"rows"`` (pointer loads, K read as ``(N, D)``
  rows and transposed in registers), ``"columns"`` (pointer loads, K read as a ``(D, N)`` tile)
  and ``"tma"`` (tensor-descriptor loads, compute capability >= 9, 16-bit inputs, 16-byte
  aligned tensors). float32 reads rows only. 16-bit inputs take rows and columns where TMA is
  not offered; where it is, rows and TMA: on sm_90 the two pointer layouts compile to the same
  machine code, and neither pointer nor TMA loads win everywhere
  (``benchmarks/results/*/kernels_pointer.log`` and ``kernels_tma.log``).
* Triton backward tiles (:mod:`.triton_backward`): per pass (``"dkdv"``, ``"dq"``) the
  ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` candidates for 16-bit inputs at head_dim up to
  128 that compile for sm_90 without register spills (dK/dV programs hold two
  ``BLOCK_N x head_dim`` float32 accumulators, so they take tall key tiles and 8 warps; dQ
  programs one ``BLOCK_M x head_dim``); float32 and head_dim 256 take small tiles.
* Under ``TRITON_INTERPRET=1`` there is no autotuning: one small tile runs, with row loads.
* Gluon: 128-key steps where the pattern's ``block_k`` allows (else 64), and a K/V ring as deep
  as shared memory allows beside the query tile (loads must run further ahead when K/V blocks
  come from HBM rather than L2; ``benchmarks/results/h100/NOTES.md``).

Override (benchmarks sweeping configurations, tests reaching one path): the
:func:`kernel_configs` context manager, backed by a :class:`contextvars.ContextVar`, so an
override holds for the calls inside the ``with`` block of this thread or task only and nests
(inner fields replace outer ones; fields left ``None`` keep the outer or built-in choice)::

    with kernel_configs(triton_tiles=[(128, 64, 4, 3)], triton_loads=["tma"]):
        sa.block_sparse_attention(q, k, v, pattern, backend="triton")

Under the interpreter ``triton_loads`` picks the one load mode that runs (TMA where the tensors
allow descriptors, else columns if asked for, else rows), for any dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..checks import check_bool

__all__ = [
    "LOAD_MODES",
    "applied",
    "backward_skips_masked_tiles",
    "backward_tiles",
    "KernelConfigs",
    "current",
    "fitting_tiles",
    "gluon_block_n",
    "gluon_stages",
    "interpreter_load_mode",
    "kernel_configs",
    "triton_load_modes",
]

Tile = tuple[int, int, int, int]

LOAD_MODES = ("rows", "columns", "tma")

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per head_dim.
TRITON_HALF_TILES: dict[int, tuple[Tile, ...]] = {
    16: ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
    32: ((128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
    64: ((128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)),
    128: ((128, 64, 4, 2), (128, 128, 8, 3), (128, 128, 8, 2), (64, 32, 4, 2)),
    256: ((128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)),
}
TRITON_FLOAT_TILES: dict[int, tuple[Tile, ...]] = {
    **{dim: ((64, 32, 4, 2), (32, 32, 4, 2)) for dim in (16, 32, 64, 128)},
    256: ((32, 32, 4, 1), (32, 16, 4, 1)),
}

# Backward passes, 16-bit inputs, by head_dim (head_dim 16 and 32 take the 64 list).
TRITON_BACKWARD_TILES: dict[str, dict[int, tuple[Tile, ...]]] = {
    "dkdv": {
        64: ((64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)),
        128: ((64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3)),
    },
    "dq": {
        64: ((128, 64, 8, 2), (64, 64, 4, 3)),
        128: ((64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)),
    },
}
TRITON_BACKWARD_SMALL_TILES: tuple[Tile, ...] = ((32, 32, 4, 1), (16, 32, 4, 1))

# Gluon: query rows per program (two consumer warpgroups of 64), shared memory per block on
# sm_90 (227 KiB), what the barriers and the compiler's scratch need beside the tiles, and the
# deepest K/V ring worth having.
GLUON_BLOCK_M = 128
GLUON_SHARED_BYTES = 232448
GLUON_SHARED_RESERVE = 3072
# Rows a token-granular program may pack (KernelConfigs.token_rows), or TOKEN_ROWS_BY_OVERLAP: chosen
# per pattern from how much neighbouring query blocks' lists overlap (triton_tokens.overlap_tile_blocks).
TOKEN_ROWS = (16, 32, 64, 128)
TOKEN_ROWS_BY_OVERLAP = "overlap"
# How the token forward steps through tiles of several query blocks (KernelConfigs.token_wide_steps).
TOKEN_WIDE_STEPS = ("branch", "masked", "zeroed_v")
# Rows a program of the token kernels' key-centric (gathered) path takes (KernelConfigs.token_gather_rows).
TOKEN_GATHER_ROWS = (64, 128)
# The token kernels' paths (KernelConfigs.token_path): query tiles, or key-centric gathered rows.
TOKEN_PATHS = ("tile", "gathered")
GLUON_MAX_STAGES = 4


GLUON_BACKWARD_PASSES = ("dkdv", "dq")


@dataclass(frozen=True)
class KernelConfigs:
    """Overrides in force; ``None`` keeps the built-in policy (see the module docstring).

    ``triton_tiles``: the Triton tile candidates, for every head_dim and dtype (those that do not
    divide the pattern's blocks are dropped). ``triton_backward_tiles``: the same for both
    backward passes. ``triton_loads``: the Triton load modes to autotune
    over, a subset of :data:`LOAD_MODES`, for 16-bit inputs (``"tma"`` only where it is offered).
    ``gluon_stages``: the Gluon K/V ring depth. ``gluon_host_descriptors``: ``False`` makes the
    Gluon kernel build its TMA descriptors per program on the device even where launch-made ones
    apply (:func:`sparse_attn.backends.gluon.uses_host_descriptors`).
    ``triton_backward_skip_masked``: ``True`` makes the Triton backward branch around tile pairs
    the causal mask hides entirely (:func:`backward_skips_masked_tiles`). ``gluon_persistent``:
    ``True`` / ``False`` forces the persistent Gluon kernel (one program per SM walking the work
    items, the next item's loads under the previous one's stores) on or off where launch-made
    descriptors apply; by default it runs on light work items only
    (:data:`sparse_attn.backends.gluon.PERSISTENT_MAX_WORK_BUCKET`). ``gluon_tall_tiles``: ``True``
    runs dense head_dim-64 patterns in 192-row query tiles over three consumer warpgroups,
    ``False`` in 128-row tiles; unset, :data:`sparse_attn.backends.gluon.TALL_TILES_BY_DEFAULT`
    (on).
    ``token_rows``: the rows a
    token-granular program packs (16, 32, 64 or 128; default 16, the smallest ``tl.dot``): more rows
    take more query tokens per tile, so a selected KV block is loaded once for more tokens
    (:func:`sparse_attn.backends.triton_tokens.token_tiling`), but each tile walks the union of
    its tokens' lists: it pays only where neighbouring tokens select the same blocks (NSA's
    module with random weights at 64K: 32 rows took twice as long as 16 on the H200; with a model
    reading text two neighbouring tokens share about 14 of their 16 blocks,
    ``benchmarks/selection_overlap.py``; on inputs that overlap as much, 64 rows with
    ``token_wide_steps="zeroed_v"`` took the module's selected branch from 17.09 to 8.68 ms at 64K
    on an H100, and on white noise from 17.29 to 19.45, its backward from 92 to 131: docs/h100.md).
    ``token_rows="overlap"`` chooses per pattern: 64 rows (and ``"zeroed_v"`` unless
    ``token_wide_steps`` says otherwise) where the lists of the tile's query blocks overlap enough,
    else the smallest tile (:func:`sparse_attn.backends.triton_tokens.overlap_tile_blocks`).
    ``kv_streams_per_wave``: how many (batch, KV head) streams the block kernels issue their
    work items for together (:func:`sparse_attn.backends.launch.heads_per_wave`); ``0`` issues
    every stream's together (query tile by query tile, all heads of a tile side by side).
    ``heavy_rows_first``: ``False`` makes the block kernels issue their heavy blocks (query blocks
    in the forwards and the backward's dQ pass, :attr:`sparse_attn.plan.BlockSparsePlan.heavy_blocks`;
    KV blocks in its dK/dV pass, :attr:`~sparse_attn.plan.BlockSparsePlan.heavy_kv_blocks`) within
    their waves like the others instead of for every stream before the waves
    (:func:`sparse_attn.backends.launch.lead_blocks`). ``gluon_backward``: ``True`` makes the
    backward's dK/dV and dQ passes run the warp-specialized Gluon kernels where they can, ``"dkdv"``
    or ``"dq"`` only that pass, ``False`` neither; unset, both run after the Gluon forward at
    head_dim 128 (:mod:`sparse_attn.backends.gluon_backward`). ``token_gather_rows``: the query rows
    a program of the token kernels' key-centric path gathers for one KV block (64 or 128; default
    :data:`sparse_attn.backends.triton_tokens_gathered.GATHER_ROWS`): more rows load each block
    once for more of the rows that listed it, in half as many programs.
    ``gluon_backward_wide_steps``: ``True`` runs the Gluon backward passes in steps of 128 query
    rows (dK/dV, head_dim 64 and ``block_q`` a multiple of 128) and 128 keys (dQ) instead of 64,
    ``False`` in 64; unset, :data:`sparse_attn.backends.gluon_backward.WIDE_STEPS_BY_DEFAULT`.
    ``token_wide_steps``: how the token-granular forward takes the key steps of a tile of several
    query blocks, whose union entries not every row lists: ``"branch"`` tests, step by step,
    whether every row lists the block and skips the non-finite-V handling when so (a branch in
    the key loop, with which Triton pipelines fewer of the K/V loads: 2 asynchronous tile copies
    against 6 in the sm_90a code); ``"masked"`` takes every step through the masked path (V's non-finite values zeroed
    and the listing rows' columns marked NaN, elementwise work on every step; the loads
    pipeline); ``"zeroed_v"`` zeroes V's non-finite values once per call, outside the kernel,
    and marks the listing rows' columns NaN after the key loop from per-block flags (no
    elementwise work on V in the loop; the loads pipeline; one more pass over V and a V-sized
    buffer); unset, :data:`sparse_attn.backends.triton_tokens.WIDE_STEPS_BY_DEFAULT`.
    ``token_path``: ``"tile"`` or ``"gathered"`` makes every token-granular pattern take that path
    of the token kernels (query tiles walking their lists, or per KV block the rows that list it);
    unset, :func:`sparse_attn.backends.triton_tokens_gathered.uses_gathered_path` chooses.
    ``rule_skip_steps``: ``False`` makes the Gluon forward take every step of a box-predicate
    rule's cut entries; unset or ``True``, a consumer warpgroup skips the steps whose key group
    none of its 64 rows may see (:mod:`sparse_attn.rule_predicate`'s group summaries; same
    results bit for bit). ``gluon_rule_block_n``: keys per step of the Gluon forward for patterns
    with a box-predicate rule (64, or 128 where ``block_k`` is a multiple of it); unset,
    :func:`gluon_block_n`. Finer steps leave more steps to skip at a lower rate per pair.
    """

    triton_tiles: tuple[Tile, ...] | None = None
    triton_backward_tiles: tuple[Tile, ...] | None = None
    triton_loads: tuple[str, ...] | None = None
    gluon_stages: int | None = None
    gluon_host_descriptors: bool | None = None
    triton_backward_skip_masked: bool | None = None
    gluon_persistent: bool | None = None
    gluon_tall_tiles: bool | None = None
    token_rows: int | str | None = None
    kv_streams_per_wave: int | None = None
    heavy_rows_first: bool | None = None
    gluon_backward: bool | str | None = None
    token_gather_rows: int | None = None
    gluon_backward_wide_steps: bool | None = None
    token_wide_steps: str | None = None
    token_path: str | None = None
    rule_skip_steps: bool | None = None
    gluon_rule_block_n: int | None = None


NO_OVERRIDES = KernelConfigs()
_CURRENT: contextvars.ContextVar[KernelConfigs] = contextvars.ContextVar(
    "sparse_attn_kernel_configs", default=NO_OVERRIDES
)


def current() -> KernelConfigs:
    """The overrides in force for this thread or task."""
    return _CURRENT.get()


@contextlib.contextmanager
def kernel_configs(
    *,
    triton_tiles: Sequence[Tile] | None = None,
    triton_backward_tiles: Sequence[Tile] | None = None,
    triton_loads: Sequence[str] | None = None,
    gluon_stages: int | None = None,
    gluon_host_descriptors: bool | None = None,
    triton_backward_skip_masked: bool | None = None,
    gluon_persistent: bool | None = None,
    gluon_tall_tiles: bool | None = None,
    token_rows: int | str | None = None,
    kv_streams_per_wave: int | None = None,
    heavy_rows_first: bool | None = None,
    gluon_backward: bool | str | None = None,
    token_gather_rows: int | None = None,
    gluon_backward_wide_steps: bool | None = None,
    token_wide_steps: str | None = None,
    token_path: str | None = None,
    rule_skip_steps: bool | None = None,
    gluon_rule_block_n: int | None = None,
) -> Iterator[KernelConfigs]:
    """Override kernel tuning choices for the calls inside the ``with`` block (see the module docstring)."""
    changes = {}
    for name, asked in (("triton_tiles", triton_tiles), ("triton_backward_tiles", triton_backward_tiles)):
        if asked is not None:
            tiles = tuple(tuple(int(value) for value in tile) for tile in asked)
            if not tiles or any(len(tile) != 4 or min(tile) < 1 for tile in tiles):
                raise ValueError(f"{name} must be (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples, got {asked!r}")
            changes[name] = tiles
    if triton_loads is not None:
        loads = tuple(triton_loads)
        if not loads or any(mode not in LOAD_MODES for mode in loads):
            raise ValueError(f"triton_loads must be a non-empty subset of {LOAD_MODES}, got {triton_loads!r}")
        changes["triton_loads"] = loads
    if gluon_stages is not None:
        if (
            isinstance(gluon_stages, bool)
            or not isinstance(gluon_stages, int)
            or not 2 <= gluon_stages <= GLUON_MAX_STAGES
        ):
            raise ValueError(f"gluon_stages must be an int in [2, {GLUON_MAX_STAGES}], got {gluon_stages!r}")
        changes["gluon_stages"] = gluon_stages
    if gluon_backward is not None:
        if not isinstance(gluon_backward, bool) and gluon_backward not in GLUON_BACKWARD_PASSES:
            raise TypeError(f"gluon_backward must be a bool or one of {GLUON_BACKWARD_PASSES}, got {gluon_backward!r}")
        changes["gluon_backward"] = gluon_backward
    flags = {
        "gluon_host_descriptors": gluon_host_descriptors,
        "triton_backward_skip_masked": triton_backward_skip_masked,
        "gluon_persistent": gluon_persistent,
        "gluon_tall_tiles": gluon_tall_tiles,
        "heavy_rows_first": heavy_rows_first,
        "gluon_backward_wide_steps": gluon_backward_wide_steps,
        "rule_skip_steps": rule_skip_steps,
    }
    for name, asked in flags.items():
        if asked is not None:
            check_bool(name, asked)
            changes[name] = asked
    if token_rows is not None:
        changes["token_rows"] = check_token_rows(token_rows)
    if token_wide_steps is not None:
        if token_wide_steps not in TOKEN_WIDE_STEPS:
            raise ValueError(f"token_wide_steps must be one of {TOKEN_WIDE_STEPS}, got {token_wide_steps!r}")
        changes["token_wide_steps"] = token_wide_steps
    if token_path is not None:
        if token_path not in TOKEN_PATHS:
            raise ValueError(f"token_path must be one of {TOKEN_PATHS}, got {token_path!r}")
        changes["token_path"] = token_path
    if gluon_rule_block_n is not None:
        if isinstance(gluon_rule_block_n, bool) or gluon_rule_block_n not in (64, 128):
            raise ValueError(f"gluon_rule_block_n must be 64 or 128, got {gluon_rule_block_n!r}")
        changes["gluon_rule_block_n"] = gluon_rule_block_n
    if token_gather_rows is not None:
        if isinstance(token_gather_rows, bool) or token_gather_rows not in TOKEN_GATHER_ROWS:
            raise ValueError(f"token_gather_rows must be one of {TOKEN_GATHER_ROWS}, got {token_gather_rows!r}")
        changes["token_gather_rows"] = token_gather_rows
    if kv_streams_per_wave is not None:
        if isinstance(kv_streams_per_wave, bool) or not isinstance(kv_streams_per_wave, int) or kv_streams_per_wave < 0:
            raise ValueError(f"kv_streams_per_wave must be an int >= 0, got {kv_streams_per_wave!r}")
        changes["kv_streams_per_wave"] = kv_streams_per_wave
    with applied(dataclasses.replace(_CURRENT.get(), **changes)) as overrides:
        yield overrides


def check_token_rows(token_rows: int | str) -> int | str:
    """``token_rows`` if it is one of :data:`TOKEN_ROWS` or :data:`TOKEN_ROWS_BY_OVERLAP`, else a ValueError."""
    if token_rows != TOKEN_ROWS_BY_OVERLAP and (isinstance(token_rows, bool) or token_rows not in TOKEN_ROWS):
        raise ValueError(f"token_rows must be one of {TOKEN_ROWS} or {TOKEN_ROWS_BY_OVERLAP!r}, got {token_rows!r}")
    return token_rows


@contextlib.contextmanager
def applied(overrides: KernelConfigs) -> Iterator[KernelConfigs]:
    """Put ``overrides`` (a :func:`current` value captured earlier) in force inside the block.

    :func:`kernel_configs` goes through it; the kernel backends' autograd capture the overrides
    of a forward and apply them to its backward, which PyTorch runs on its own thread for CUDA
    tensors, where the forward's context variables are not set."""
    token = _CURRENT.set(overrides)
    try:
        yield overrides
    finally:
        _CURRENT.reset(token)


def fitting_tiles(head_dim: int, block_q: int, block_k: int, *, is_float32: bool) -> tuple[Tile, ...]:
    """The Triton tile candidates whose tiles divide the pattern's blocks (a small default if none does)."""
    candidates = current().triton_tiles or (TRITON_FLOAT_TILES if is_float32 else TRITON_HALF_TILES)[head_dim]
    fitting = tuple(tile for tile in candidates if block_q % tile[0] == 0 and block_k % tile[1] == 0)
    return fitting or ((min(block_q, 64), min(block_k, 32), 4, 2),)


def backward_tiles(kind: str, head_dim: int, block_q: int, block_k: int, *, small: bool) -> tuple[Tile, ...]:
    """The backward pass ``kind``'s (``"dkdv"`` or ``"dq"``) tile candidates that divide the
    pattern's blocks (a small default if none does); ``small`` for float32 or head_dim 256."""
    if current().triton_backward_tiles is not None:
        candidates = current().triton_backward_tiles
    else:
        candidates = TRITON_BACKWARD_SMALL_TILES if small else TRITON_BACKWARD_TILES[kind][max(head_dim, 64)]
    fitting = tuple(tile for tile in candidates if block_q % tile[0] == 0 and block_k % tile[1] == 0)
    return fitting or ((min(block_q, 16), min(block_k, 16), 4, 1),)


def backward_skips_masked_tiles() -> bool:
    """Whether the Triton backward kernels branch around causally masked tile pairs (see
    :mod:`.triton_backward`); the default is not to, so their loops stay software-pipelined."""
    asked = current().triton_backward_skip_masked
    return False if asked is None else asked


def triton_load_modes(*, is_float32: bool, tma_offered: bool) -> tuple[str, ...]:
    """The load modes the Triton autotuner tries (see the module docstring)."""
    if is_float32:
        return ("rows",)
    asked = current().triton_loads
    if asked is None:
        return ("rows", "tma") if tma_offered else ("rows", "columns")
    usable = tuple(mode for mode in asked if tma_offered or mode != "tma")
    return usable or ("rows", "columns")


def interpreter_load_mode(*, descriptors_allowed: bool) -> str:
    """The one load mode the interpreter runs: rows unless ``triton_loads`` asks for another."""
    asked = current().triton_loads or ("rows",)
    if "tma" in asked and descriptors_allowed:
        return "tma"
    return "columns" if "columns" in asked else "rows"


def gluon_block_n(block_k: int, *, rule: bool = False) -> int:
    """Keys per Gluon step: 128 where the pattern's KV block is a multiple of it, else 64; for a
    pattern with a box-predicate ``rule``, ``kernel_configs(gluon_rule_block_n=...)`` where it
    divides ``block_k``."""
    asked = current().gluon_rule_block_n if rule else None
    if asked is not None and block_k % asked == 0:
        return asked
    return 128 if block_k % 128 == 0 else 64


def gluon_stages(head_dim: int, block_n: int, element_size: int = 2) -> int:
    """K/V ring depth: the override, or as many (K, V) tile pairs as fit beside the query tile."""
    if current().gluon_stages is not None:
        return current().gluon_stages
    tile = block_n * head_dim * element_size
    free = GLUON_SHARED_BYTES - GLUON_SHARED_RESERVE - GLUON_BLOCK_M * head_dim * element_size
    return max(2, min(GLUON_MAX_STAGES, free // (2 * tile)))
