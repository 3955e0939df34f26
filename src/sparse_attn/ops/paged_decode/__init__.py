"""Paged decode attention: one new query token per sequence against selected pages (or tokens) of a paged KV cache.

Layout (what the kernel reads, and why):

* ``k_pages`` / ``v_pages`` ``(num_pages, Hkv, P, D)``: a page holds ``P`` consecutive tokens of
  one sequence for every KV head; one KV head's page is ``P * D`` contiguous elements (4 KiB
  at ``P = 16``, ``D = 128``, bf16), so a page read for one head is one contiguous burst. The
  pages of a sequence need not be contiguous or in order: ``page_table[b, i]`` is the physical
  page holding tokens ``[i * P, (i + 1) * P)`` of sequence ``b``.
* ``seq_lens`` ``(B,)``: each sequence's length; the last page may be partial.
* ``selected`` ``(B, Hkv, max_sel)`` / ``selected_counts`` ``(B, Hkv)``: per sequence and KV
  head, the first ``selected_counts`` entries name blocks of ``select_block`` tokens (block
  ``u`` = logical tokens ``[u * select_block, (u + 1) * select_block)``). ``select_block = P``
  selects pages (Quest, streaming, dense), ``select_block = 1`` tokens (Double Sparsity,
  TidalDecode). The selection is shared by the query heads of a GQA group, as Quest and NSA
  share theirs per group, so the kernel reads each selected key once per group.

Dense decode is every page selected. Reference: :mod:`.naive`; kernel: the split-K kernel of
:mod:`.triton` (CUDA, head_dim 16-256, power-of-two page size and select block), chosen by the
dispatch rule of :mod:`sparse_attn.ops._dispatch`; on CUDA a case the kernel refuses runs the
reference with a warning naming why.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from .._dispatch import kernel_for
from .naive import check_paged_decode_inputs, gather_selected, paged_decode_reference

__all__ = ["check_paged_decode_inputs", "gather_selected", "paged_decode"]


def paged_decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    selected_counts: torch.Tensor,
    *,
    scale: float | None = None,
    select_block: int | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
):
    """Attention of q ``(B, Hq, D)`` over the selected tokens of a paged KV cache (layout above).

    ``scale`` defaults to ``D ** -0.5``; ``select_block`` to the page size. ``num_splits``
    (kernel only; default from the shapes) is the number of CTAs per (sequence, KV head).
    Returns ``out`` ``(B, Hq, D)`` in q's dtype, and with ``return_lse`` also float32 ``(B, Hq)``
    log-sum-exp of the scaled scores (natural log). A (sequence, KV head) with no valid
    selected token gives zeros and an LSE of ``-inf`` (the decode methods always select the
    newest token, so this happens only for hand-made selections).

    Example (dense decode: every page of every sequence selected)::

        pages = torch.arange(max_pages, dtype=torch.int32)
        selected = pages.expand(batch, kv_heads, max_pages).contiguous()
        counts = ((seq_lens + P - 1) // P)[:, None].expand(batch, kv_heads).contiguous()
        out = paged_decode(q, k_pages, v_pages, page_table, seq_lens, selected, counts)
    """
    page_size = k_pages.shape[2] if isinstance(k_pages, torch.Tensor) and k_pages.dim() == 4 else None
    select_block = page_size if select_block is None else select_block
    scale = check_paged_decode_inputs(
        q, k_pages, v_pages, page_table, seq_lens, selected, selected_counts, select_block=select_block, scale=scale
    )
    arguments = (q, k_pages, v_pages, page_table, seq_lens, selected, selected_counts)
    case = dict(head_dim=q.shape[-1], select_block=select_block, page_size=page_size)
    kernel = kernel_for(q, __package__, **case)
    if kernel is not None:
        out, lse = kernel.paged_decode_triton(*arguments, scale=scale, select_block=select_block, num_splits=num_splits)
    else:
        if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            reason = importlib.import_module(".triton", __package__).unsupported_reason(q, **case)
            warnings.warn(f"paged_decode: {reason}; using the PyTorch reference", stacklevel=2)
        out, lse = paged_decode_reference(*arguments, scale=scale, select_block=select_block)
    return (out, lse) if return_lse else out
