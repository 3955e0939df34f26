"""Fused Quest page selection: bounds and top-k in registers, no score tensor through torch ops.

Scores and ranks are those of :mod:`.naive` (module docstring there). Each score is packed with
its page index into one int64 sort key, ``(order-preserving int32 of the float32 score) << 32 |
(2^31 - 1 - index)``, so one descending ``tl.topk`` (Triton's bitonic top-k) ranks by score and
breaks ties to the lower index, exactly the reference's stable sort. A group's bound is a
matrix-vector product (the clamped query heads summed over the group first), so each page's
summaries are read once and reduced on the CUDA cores; tiles of pages are folded into a
register tile of keys (``tl.where`` on the tile's row), which ``tl.topk`` then ranks.

* One level (:func:`select_pages_triton`): one program per (sequence, KV head, chunk of
  ``CHUNK`` logical pages) computes the chunk's bounds and its top ``K`` keys; a second kernel
  takes each (sequence, KV head)'s top ``K`` of the chunks' candidates. When one chunk covers
  the table the first kernel writes the selection itself (one launch).
* Two levels (:func:`select_pages_two_level_triton`): one program per (sequence, KV head): the
  bounds of every super-page from the coarse summaries, their top ``super_budget``, then the
  bounds of the pages inside those super-pages and their top ``budget``, in one launch. It
  reads ``1/G`` of the one-level summaries plus the candidates' (``super_budget * G`` pages).

Outputs are written whole (every entry of ``selected``, zeros past the count, and ``counts``)
from the device's page counts: no host synchronisation, so the launches can be captured in a
CUDA graph.
"""

from __future__ import annotations

import functools

import torch

from ...utils import interpreting
from ..page_bounds.triton import unsupported_reason as grouped_tile_unsupported_reason

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["select_pages_triton", "select_pages_two_level_triton", "unsupported_reason"]

# Programs to aim for in the one-level bounds kernel (a few waves over the SMs).
PROGRAMS_PER_SM = 4
MAX_CHUNK = 2048


def unsupported_reason(q: torch.Tensor, *, head_dim: int) -> str | None:
    """Why the selection kernels cannot run this case, or ``None`` (the page bounds kernel's rule)."""
    return grouped_tile_unsupported_reason(q, head_dim=head_dim)


def allocate_int32(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uninitialized int32 kernel output (the kernels write every element); tests replace it to poison."""
    return torch.empty(shape, dtype=torch.int32, device=device)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


if triton is not None:
    MIN_KEY = tl.constexpr(-(2**63))

    @triton.jit
    def _sort_key(score, index):
        """int64 key: the order-preserving int32 of float32 ``score`` (``-0.0`` as ``+0.0``) above
        ``2^31 - 1 - index`` (ties go to the lower index)."""
        bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (bits.to(tl.int64) << 32) | (0x7FFFFFFF - index).to(tl.int64)

    @triton.jit
    def _key_index(key):
        return 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)

    @triton.jit
    def _group_query(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr):
        """The group's query heads, clamped and summed: ``(sum_h max(q_h, 0), sum_h min(q_h, 0))``, float32 ``[D]``."""
        rows = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, HEAD_DIM)
        heads = kv_head * group + rows
        q = tl.load(
            Q + batch.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=(rows < group)[:, None],
            other=0.0,
        ).to(tl.float32)
        return tl.sum(tl.maximum(q, 0.0), 0), tl.sum(tl.minimum(q, 0.0), 0)

    @triton.jit
    def _bounds(Min, Max, rows, ok, positive, negative, HEAD_DIM: tl.constexpr):
        """Bounds of the summaries at row offsets ``rows`` (``[N]`` int64 element offsets), float32 ``[N]``."""
        offs_d = tl.arange(0, HEAD_DIM)
        upper = tl.load(Max + rows[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        lower = tl.load(Min + rows[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        return tl.sum(upper * positive[None, :] + lower * negative[None, :], 1)

    @triton.jit
    def _write_selection(top, Selected, Counts, batch, kv_head, stride_sb, stride_sh, stride_cb, used, budget,
                         K_TILE: tl.constexpr):  # fmt: skip
        rank = tl.arange(0, K_TILE)
        count = tl.minimum(used, budget)
        index = tl.where(rank < count, _key_index(top), 0)
        tl.store(Selected + batch.to(tl.int64) * stride_sb + kv_head * stride_sh + rank, index, mask=rank < budget)
        tl.store(Counts + batch * stride_cb + kv_head, count)

    @triton.jit
    def _chunk_topk(
        Q,
        KeyMin,
        KeyMax,
        PageTable,
        PageCounts,
        Selected,
        Counts,
        Candidates,
        stride_qb,
        stride_qh,
        stride_sp,
        stride_sh,
        stride_tb,
        stride_sb,
        stride_sh_out,
        stride_cb,
        num_kv_heads,
        group,
        max_pages,
        budget,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_P: tl.constexpr,
        CHUNK: tl.constexpr,
        K_TILE: tl.constexpr,
        FINAL: tl.constexpr,
    ):
        """One (sequence, KV head, chunk): the chunk's page bounds and its top ``K_TILE`` keys
        (``FINAL``: the selection itself)."""
        batch = tl.program_id(0) // num_kv_heads
        kv_head = tl.program_id(0) % num_kv_heads
        chunk = tl.program_id(1)
        positive, negative = _group_query(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM, BLOCK_G)
        used = tl.load(PageCounts + batch)
        tiles = tl.arange(0, CHUNK // BLOCK_P)
        keys = tl.full([CHUNK // BLOCK_P, BLOCK_P], MIN_KEY, tl.int64)
        for t in range(CHUNK // BLOCK_P):
            pages = chunk * CHUNK + t * BLOCK_P + tl.arange(0, BLOCK_P)
            in_sequence = pages < used
            physical = tl.load(PageTable + batch.to(tl.int64) * stride_tb + pages, mask=in_sequence, other=0)
            rows = physical.to(tl.int64) * stride_sp + kv_head * stride_sh
            bound = _bounds(KeyMin, KeyMax, rows, in_sequence, positive, negative, HEAD_DIM)
            bound = tl.where(in_sequence, bound, float("-inf"))
            bound = tl.where(pages == used - 1, float("inf"), bound)
            key = tl.where(pages < max_pages, _sort_key(bound, pages), MIN_KEY)
            keys = tl.where(tiles[:, None] == t, key[None, :], keys)
        top = tl.topk(tl.reshape(keys, [CHUNK]), K_TILE)
        if FINAL:
            _write_selection(top, Selected, Counts, batch, kv_head, stride_sb, stride_sh_out, stride_cb, used, budget,
                             K_TILE)  # fmt: skip
        else:
            base = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + chunk) * K_TILE
            tl.store(Candidates + base + tl.arange(0, K_TILE), top)

    @triton.jit
    def _merge_topk(
        Candidates,
        PageCounts,
        Selected,
        Counts,
        stride_sb,
        stride_sh,
        stride_cb,
        num_kv_heads,
        num_candidates,
        budget,
        N_TILE: tl.constexpr,
        K_TILE: tl.constexpr,
    ):
        """One (sequence, KV head): the top ``K_TILE`` of its chunks' candidate keys."""
        batch = tl.program_id(0) // num_kv_heads
        kv_head = tl.program_id(0) % num_kv_heads
        offs = tl.arange(0, N_TILE)
        keys = tl.load(
            Candidates + tl.program_id(0).to(tl.int64) * num_candidates + offs,
            mask=offs < num_candidates,
            other=MIN_KEY,
        )
        top = tl.topk(keys, K_TILE)
        used = tl.load(PageCounts + batch)
        _write_selection(top, Selected, Counts, batch, kv_head, stride_sb, stride_sh, stride_cb, used, budget, K_TILE)

    @triton.jit
    def _two_level(
        Q,
        KeyMin,
        KeyMax,
        SuperMin,
        SuperMax,
        PageTable,
        PageCounts,
        Selected,
        Counts,
        stride_qb,
        stride_qh,
        stride_sp,
        stride_sh,
        stride_ub,
        stride_us,
        stride_uh,
        stride_tb,
        stride_sb,
        stride_sh_out,
        stride_cb,
        num_kv_heads,
        group,
        max_super,
        budget,
        super_budget,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        SUPER_PAGE: tl.constexpr,
        BLOCK_S: tl.constexpr,
        S_TILE: tl.constexpr,
        SEL_TILE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        K_TILE: tl.constexpr,
    ):
        """One (sequence, KV head): top super-pages by their coarse bounds, then top pages inside them."""
        batch = tl.program_id(0) // num_kv_heads
        kv_head = tl.program_id(0) % num_kv_heads
        positive, negative = _group_query(Q, batch, kv_head, stride_qb, stride_qh, group, HEAD_DIM, BLOCK_G)
        used = tl.load(PageCounts + batch)
        supers = tl.cdiv(used, SUPER_PAGE)

        # Level 1: every super-page's bound; the newest super-page first.
        tiles = tl.arange(0, S_TILE // BLOCK_S)
        keys = tl.full([S_TILE // BLOCK_S, BLOCK_S], MIN_KEY, tl.int64)
        for t in range(S_TILE // BLOCK_S):
            index = t * BLOCK_S + tl.arange(0, BLOCK_S)
            ok = index < supers
            rows = batch.to(tl.int64) * stride_ub + index.to(tl.int64) * stride_us + kv_head * stride_uh
            bound = _bounds(SuperMin, SuperMax, rows, ok, positive, negative, HEAD_DIM)
            bound = tl.where(index == supers - 1, float("inf"), bound)
            key = tl.where(ok, _sort_key(bound, index), MIN_KEY)
            keys = tl.where(tiles[:, None] == t, key[None, :], keys)
        rank = tl.arange(0, SEL_TILE)
        top_supers = tl.topk(tl.reshape(keys, [S_TILE]), SEL_TILE)
        chosen = _key_index(top_supers)
        chosen = tl.where((rank < super_budget) & (chosen < supers), chosen, -1)

        # Level 2: the pages of the chosen super-pages (candidate c: the (c % G)-th page of the
        # (c // G)-th chosen super-page).
        tiles = tl.arange(0, SEL_TILE * SUPER_PAGE // BLOCK_P)
        keys = tl.full([SEL_TILE * SUPER_PAGE // BLOCK_P, BLOCK_P], MIN_KEY, tl.int64)
        for t in range(SEL_TILE * SUPER_PAGE // BLOCK_P):
            candidate = t * BLOCK_P + tl.arange(0, BLOCK_P)
            owner = tl.sum(tl.where(rank[None, :] == (candidate // SUPER_PAGE)[:, None], chosen[None, :], 0), 1)
            pages = owner * SUPER_PAGE + candidate % SUPER_PAGE
            ok = (owner >= 0) & (pages < used)
            physical = tl.load(PageTable + batch.to(tl.int64) * stride_tb + pages, mask=ok, other=0)
            rows = physical.to(tl.int64) * stride_sp + kv_head * stride_sh
            bound = _bounds(KeyMin, KeyMax, rows, ok, positive, negative, HEAD_DIM)
            bound = tl.where(pages == used - 1, float("inf"), bound)
            key = tl.where(ok, _sort_key(bound, pages), MIN_KEY)
            keys = tl.where(tiles[:, None] == t, key[None, :], keys)
        top = tl.topk(tl.reshape(keys, [SEL_TILE * SUPER_PAGE]), K_TILE)
        _write_selection(top, Selected, Counts, batch, kv_head, stride_sb, stride_sh_out, stride_cb, used, budget,
                         K_TILE)  # fmt: skip


@functools.cache
def _autotuned(name: str, blocks: tuple[str, ...], candidate_set: tuple, key: tuple[str, ...]):
    """Kernel ``name`` autotuned over ``(block, num_warps)`` candidates (each of ``blocks`` set to the block)."""
    configs = [triton.Config(dict.fromkeys(blocks, b), num_warps=w) for b, w in candidate_set]
    return triton.autotune(configs=configs, key=list(key))(globals()[name])


def _launch(name: str, grid, args, constants: dict, blocks: dict[str, int]) -> None:
    """Launch kernel ``name``: autotuned over tile sizes up to each of ``blocks``' caps and 4 or 8 warps
    on a GPU; one small tile under the interpreter."""
    if interpreting():
        globals()[name][grid](*args, **constants, **{block: min(64, cap) for block, cap in blocks.items()})
        return
    smallest = min(blocks.values())
    # Also 16 warps on 128 or 256 summaries per tile: the kernel is a chain of dependent loads,
    # so one wide tile per level (all its loads in flight at once) can beat a loop of narrow
    # ones. (256 at 8 warps spills heavily in the sm_90 build, an 11 KB stack frame per thread:
    # not a candidate.)
    candidate_set = tuple((b, w) for b in (32, 64, 128) if b <= smallest for w in (4, 8))
    candidate_set += tuple((b, 16) for b in (128, 256) if b <= smallest)
    candidate_set = candidate_set or ((smallest, 4),)
    key = tuple(sorted(constants))
    kernel = _autotuned(name, tuple(blocks), candidate_set, key)
    kernel[grid](*args, **constants)


def _outputs(batch: int, kv_heads: int, keep: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return allocate_int32((batch, kv_heads, keep), device), allocate_int32((batch, kv_heads), device)


def _check_case(q: torch.Tensor) -> None:
    reason = unsupported_reason(q, head_dim=q.shape[-1])
    if reason is not None:
        raise ValueError(f"the page selection kernels cannot run this case: {reason}")


def select_pages_triton(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    page_table: torch.Tensor,
    page_counts: torch.Tensor,
    budget: int,
    *,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.naive.select_pages_reference` in one or two kernels; same arguments and results.

    ``chunk`` (a power of two; default from the shapes) is the pages each program of the first
    kernel ranks.
    """
    _check_case(q)
    batch, q_heads, dim = q.shape
    kv_heads = key_min.shape[1]
    max_pages = page_table.shape[1]
    keep = min(budget, max_pages)
    k_tile = _pow2(keep)
    if chunk is None:
        multiprocessors = 4 if interpreting() else _multiprocessors(q.device)
        wanted = -(-PROGRAMS_PER_SM * multiprocessors // (batch * kv_heads))
        chunk = min(MAX_CHUNK, _pow2(-(-max_pages // wanted)))
    chunk = max(chunk, k_tile, 16)
    block_p = min(chunk, 64 if dim <= 128 else 32)
    chunks = -(-max_pages // chunk)
    selected, counts = _outputs(batch, kv_heads, keep, q.device)
    final = chunks == 1
    candidates = (
        selected if final else torch.empty(batch * kv_heads * chunks * k_tile, dtype=torch.int64, device=q.device)
    )
    _chunk_topk[(batch * kv_heads, chunks)](
        q, key_min, key_max, page_table, page_counts, selected, counts, candidates,
        *q.stride()[:2], *key_min.stride()[:2], page_table.stride(0), *selected.stride()[:2], counts.stride(0),
        kv_heads, q_heads // kv_heads, max_pages, keep,
        HEAD_DIM=dim, BLOCK_G=_pow2(q_heads // kv_heads), BLOCK_P=block_p, CHUNK=chunk, K_TILE=k_tile, FINAL=final,
    )  # fmt: skip
    if not final:
        _merge_topk[(batch * kv_heads,)](
            candidates, page_counts, selected, counts, *selected.stride()[:2], counts.stride(0),
            kv_heads, chunks * k_tile, keep, N_TILE=_pow2(chunks * k_tile), K_TILE=k_tile,
        )  # fmt: skip
    return selected, counts


def select_pages_two_level_triton(
    q: torch.Tensor,
    key_min: torch.Tensor,
    key_max: torch.Tensor,
    super_min: torch.Tensor,
    super_max: torch.Tensor,
    page_table: torch.Tensor,
    page_counts: torch.Tensor,
    budget: int,
    *,
    super_page: int,
    super_budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.naive.select_pages_two_level_reference` in one kernel; same arguments and results
    (``super_page`` a power of two)."""
    _check_case(q)
    if super_page & (super_page - 1):
        raise ValueError(f"the two-level selection kernel takes a power-of-two super_page, not {super_page}")
    batch, q_heads, dim = q.shape
    kv_heads = key_min.shape[1]
    max_pages, max_super = page_table.shape[1], super_min.shape[1]
    keep = min(budget, max_pages)
    # The table's super-pages (the summaries may hold more rows: their capacity).
    table_supers = -(-max_pages // super_page)
    super_budget = min(super_budget, table_supers)
    s_tile = _pow2(table_supers)
    sel_tile = _pow2(super_budget)
    block = 256 if dim <= 128 else 64
    selected, counts = _outputs(batch, kv_heads, keep, q.device)
    args = (
        q, key_min, key_max, super_min, super_max, page_table, page_counts, selected, counts,
        *q.stride()[:2], *key_min.stride()[:2], *super_min.stride()[:3], page_table.stride(0),
        *selected.stride()[:2], counts.stride(0),
        kv_heads, q_heads // kv_heads, max_super, keep, super_budget,
    )  # fmt: skip
    constants = dict(
        HEAD_DIM=dim, BLOCK_G=_pow2(q_heads // kv_heads), SUPER_PAGE=super_page, S_TILE=s_tile, SEL_TILE=sel_tile,
        K_TILE=_pow2(keep),
    )  # fmt: skip
    caps = {"BLOCK_S": min(block, s_tile), "BLOCK_P": min(block, sel_tile * super_page)}
    _launch("_two_level", (batch * kv_heads,), args, constants, caps)
    return selected, counts
