"""Split-K paged decode kernel (flash-decoding over a selection of KV pages or tokens).

Work split: one program per (sequence, KV head, split). The program packs the ``group``
query heads that share the KV head into the rows of one tile (padded to ``BLOCK_G >= 16``
rows, the smallest ``tl.dot`` operand), so every selected key is read once per group, not
once per query head. A (sequence, KV head)'s selected entries are cut into ``num_splits``
contiguous chunks, one per program (flash-decoding's split-K): with few sequences and KV
heads there are still enough programs to keep every SM streaming. Each program walks its
chunk ``BLOCK_N`` keys at a time; a tile's keys are gathered through the page table (a key's
address is its physical page, KV head and row; with 16-token pages one 64-key tile spans 4
pages, each page's ``P x D`` rows contiguous for the head), so pages and tokens need not be
contiguous in memory. Keys at or past the sequence length (the partial last page) are masked.

Partial results: each split writes its normalized output (float32) and its LSE (log2 units)
for the group's rows; a second, small kernel combines the splits of each query head
(``out = sum_s 2^(lse_s - lse) out_s``). With one split the first kernel writes the final
output directly and no combine runs.

Hopper TMA loads were tried and not adopted: with one page per iteration read as a TMA box
(a device-side descriptor over the page pool), the attention took 27.8 µs at 128K, batch 8,
budget 2048 on 16-token pages against 25.2 µs with these pointer loads (byte floor 14.0 µs),
and 46.3 against 47.1 µs at budget 4096; every load method measured reached 2.7-3.2 TB/s on
the scattered 4 KB pages (``benchmarks/results/h200/decode_tma_s44.json``, ``docs/decode.md``).

Tile choice: autotuned over ``BLOCK_N`` / warps / stages, keyed by head_dim, select block,
group tile and ``ceil(log2(entries per split))``. Under ``TRITON_INTERPRET=1`` one small
configuration runs and bf16 products are taken in float32 (:func:`sparse_attn.utils.dot_in_float32`).
"""

from __future__ import annotations

import functools

import torch

from ...backends import launch
from ...utils import dot_in_float32, interpreting, length_bucket
from ..page_bounds.triton import unsupported_reason as grouped_tile_unsupported_reason

try:
    import triton
    import triton.language as tl

    from .._triton_util import online_softmax_step
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["choose_num_splits", "paged_decode_triton", "unsupported_reason"]

LOG2_E = 1.4426950408889634
# Programs to aim for: a few waves over the SMs, so the last wave's tail is short.
PROGRAMS_PER_SM = 4
MIN_ENTRY_TOKENS_PER_SPLIT = 256


def unsupported_reason(q: torch.Tensor, *, head_dim: int, select_block: int, page_size: int) -> str | None:
    """Why :func:`paged_decode_triton` cannot run this case, or ``None``."""
    reason = grouped_tile_unsupported_reason(q, head_dim=head_dim)
    if reason is not None:
        return reason
    if select_block > 128 or select_block & (select_block - 1):
        return f"the paged decode kernel takes a select_block that is a power of two <= 128, not {select_block}"
    if page_size & (page_size - 1):
        return f"the paged decode kernel takes a power-of-two page size, not {page_size}"
    return None


def choose_num_splits(batch: int, kv_heads: int, max_sel_tokens: int, multiprocessors: int) -> int:
    """Splits per (sequence, KV head): enough programs for ``PROGRAMS_PER_SM`` waves, each split
    holding at least ``MIN_ENTRY_TOKENS_PER_SPLIT`` selectable tokens (fewer splits would leave
    SMs idle; more would only add partial results to combine). From shapes only: no device sync."""
    wanted = -(-PROGRAMS_PER_SM * multiprocessors // (batch * kv_heads))
    useful = max(1, max_sel_tokens // MIN_ENTRY_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful))


if triton is not None:

    @triton.jit
    def _paged_decode_split(
        Q,
        KPages,
        VPages,
        PageTable,
        SeqLens,
        Selected,
        Counts,
        Out,
        Lse,
        stride_qb,
        stride_qh,
        stride_kp,
        stride_kh,
        stride_ks,
        stride_vp,
        stride_vh,
        stride_vs,
        stride_tb,
        stride_sb,
        stride_sh,
        stride_cb,
        stride_ch,
        stride_ob,
        stride_oh,
        stride_os,
        num_kv_heads,
        group,
        entries_per_split,
        qk_scale,
        split_bucket,  # autotuning key only: ceil(log2(entries per split))
        HEAD_DIM: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        SELECT_BLOCK: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FINAL: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One (sequence, KV head, split): online softmax over the split's selected entries.

        ``FINAL`` (one split): ``Out`` is the ``(B, Hq, D)`` output in q's dtype and ``Lse``
        ``(B, Hq)`` in natural-log units. Otherwise ``Out`` is the float32 ``(B, Hq, splits, D)``
        partial output and ``Lse`` the float32 ``(B, Hq, splits)`` partial LSE in log2 units.
        """
        ENTRIES_PER_TILE: tl.constexpr = BLOCK_N // SELECT_BLOCK
        batch = tl.program_id(0) // num_kv_heads
        kv_head = tl.program_id(0) % num_kv_heads
        split = tl.program_id(1)
        rows = tl.arange(0, BLOCK_G)
        row_ok = rows < group
        heads = kv_head * group + rows
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)

        q_pointers = Q + batch.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_pointers, mask=row_ok[:, None], other=0.0)
        seq_len = tl.load(SeqLens + batch)
        count = tl.load(Counts + batch * stride_cb + kv_head * stride_ch)
        first = split * entries_per_split
        last = tl.minimum(count, first + entries_per_split)
        selected_base = Selected + batch.to(tl.int64) * stride_sb + kv_head * stride_sh
        table_base = PageTable + batch.to(tl.int64) * stride_tb
        k_base = KPages + kv_head.to(tl.int64) * stride_kh
        v_base = VPages + kv_head.to(tl.int64) * stride_vh
        entry_in_tile = offs_n // SELECT_BLOCK
        within = offs_n % SELECT_BLOCK

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
        for tile_start in range(first, last, ENTRIES_PER_TILE):
            slot = tile_start + entry_in_tile
            slot_ok = slot < last
            unit = tl.load(selected_base + slot, mask=slot_ok, other=0)
            token = unit * SELECT_BLOCK + within
            key_ok = slot_ok & (token < seq_len)
            page = tl.load(table_base + token // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
            row_in_page = token % PAGE_SIZE
            k_pointers = k_base + page[:, None] * stride_kp + row_in_page[:, None] * stride_ks + offs_d[None, :]
            v_pointers = v_base + page[:, None] * stride_vp + row_in_page[:, None] * stride_vs + offs_d[None, :]
            _, m_i, l_i, acc = online_softmax_step(q, k_pointers, v_pointers, key_ok, m_i, l_i, acc, qk_scale, DOT_FP32,
                                                   PRECISION)  # fmt: skip

        has_keys = l_i > 0.0
        out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        out_base = Out + batch.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        if FINAL:
            tl.store(out_base, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
            # Scores were kept in log2 units; the LSE is returned in natural-log units.
            tl.store(Lse + (batch * num_kv_heads * group + heads), lse * 0.6931471805599453, mask=row_ok)
        else:
            tl.store(out_base + split * stride_os, out, mask=row_ok[:, None])
            num_splits = tl.num_programs(1)
            partial_lse = Lse + (batch * num_kv_heads * group + heads) * num_splits + split
            tl.store(partial_lse, lse, mask=row_ok)

    @triton.jit
    def _combine_splits(
        PartialOut,
        PartialLse,
        Out,
        Lse,
        num_splits,
        stride_ob,
        stride_oh,
        q_heads,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """One (sequence, query head): the splits' outputs weighted by their share of the softmax mass."""
        batch_head = tl.program_id(0)
        batch = batch_head // q_heads
        head = batch_head % q_heads
        splits = tl.arange(0, BLOCK_S)
        split_ok = splits < num_splits
        offs_d = tl.arange(0, HEAD_DIM)
        lse = tl.load(PartialLse + batch_head.to(tl.int64) * num_splits + splits, mask=split_ok, other=float("-inf"))
        lse_max = tl.max(lse, 0)
        safe_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        weights = tl.math.exp2(lse - safe_max)
        total = tl.sum(weights, 0)
        partial_pointers = (
            PartialOut + (batch_head.to(tl.int64) * num_splits + splits[:, None]) * HEAD_DIM + offs_d[None, :]
        )
        partial = tl.load(partial_pointers, mask=split_ok[:, None], other=0.0)
        has_keys = total > 0.0
        out = tl.sum(partial * weights[:, None], 0) / tl.where(has_keys, total, 1.0)
        out_pointers = Out + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_d
        tl.store(out_pointers, out.to(Out.dtype.element_ty))
        final_lse = tl.where(
            has_keys, (safe_max + tl.math.log2(tl.where(has_keys, total, 1.0))) * 0.6931471805599453, float("-inf")
        )
        tl.store(Lse + batch_head, final_lse)


def candidates(head_dim: int, select_block: int) -> tuple:
    """``(BLOCK_N, num_warps, num_stages)`` candidates: tiles of whole select blocks, smaller at head_dim 256."""
    tiles = (32, 64) if head_dim == 256 else (32, 64, 128)
    return tuple((n, warps, stages) for n in tiles if n >= select_block for warps in (4, 8) for stages in (2, 3)) or (
        (select_block, 4, 2),
    )


@functools.cache
def autotuned_split_kernel(candidate_set: tuple):
    """One autotuner per candidate set."""
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in candidate_set]
    return triton.autotune(
        configs=configs, key=["split_bucket", "HEAD_DIM", "PAGE_SIZE", "SELECT_BLOCK", "BLOCK_G", "FINAL", "PRECISION"]
    )(_paged_decode_split)


def paged_decode_triton(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    selected_counts: torch.Tensor,
    *,
    scale: float,
    select_block: int,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.naive.paged_decode_reference` in the split-K kernel; same arguments and results.

    ``num_splits`` (default: :func:`choose_num_splits`) is the number of chunks each
    (sequence, KV head)'s selection is cut into.
    """
    batch, q_heads, dim = q.shape
    kv_heads, page_size = k_pages.shape[1], k_pages.shape[2]
    reason = unsupported_reason(q, head_dim=dim, select_block=select_block, page_size=page_size)
    if reason is not None:
        raise ValueError(f"the paged decode kernel cannot run this case: {reason}")
    group = q_heads // kv_heads
    max_sel = selected.shape[2]
    if num_splits is None:
        multiprocessors = 4 if interpreting() else torch.cuda.get_device_properties(q.device).multi_processor_count
        num_splits = choose_num_splits(batch, kv_heads, max_sel * select_block, multiprocessors)
    num_splits = max(1, min(num_splits, max(max_sel, 1)))
    entries_per_split = -(-max_sel // num_splits)
    q, k_pages, v_pages = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_pages, v_pages))
    page_table, seq_lens, selected, selected_counts = (
        x.contiguous() for x in (page_table, seq_lens, selected, selected_counts)
    )
    out = launch.allocate((batch, q_heads, dim), q.dtype, q.device)
    lse = launch.allocate((batch, q_heads), torch.float32, q.device)
    final = num_splits == 1
    if final:
        split_out, split_lse = out, lse
        out_strides = (*out.stride()[:2], 0)
    else:
        split_out = launch.allocate((batch, q_heads, num_splits, dim), torch.float32, q.device)
        split_lse = launch.allocate((batch, q_heads, num_splits), torch.float32, q.device)
        out_strides = split_out.stride()[:3]
    use_float32_dot = dot_in_float32(q.dtype)
    args = (
        *(q, k_pages, v_pages, page_table, seq_lens, selected, selected_counts, split_out, split_lse),
        *q.stride()[:2],
        *k_pages.stride()[:3],
        *v_pages.stride()[:3],
        page_table.stride(0),
        *selected.stride()[:2],
        *selected_counts.stride(),
        *out_strides,
        *(kv_heads, group, entries_per_split, scale * LOG2_E, length_bucket(entries_per_split)),
    )
    constants = dict(
        HEAD_DIM=dim,
        PAGE_SIZE=page_size,
        SELECT_BLOCK=select_block,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        FINAL=final,
        DOT_FP32=use_float32_dot,
        PRECISION="ieee" if use_float32_dot else "tf32",
    )
    grid = (batch * kv_heads, num_splits)
    if interpreting():
        _paged_decode_split[grid](*args, BLOCK_N=max(16, select_block), **constants)
    else:
        autotuned_split_kernel(candidates(dim, select_block))[grid](*args, **constants)
    if not final:
        _combine_splits[(batch * q_heads,)](
            split_out, split_lse, out, lse, num_splits, *out.stride()[:2], q_heads,
            HEAD_DIM=dim, BLOCK_S=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out, lse
