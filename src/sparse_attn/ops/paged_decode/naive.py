"""Paged decode attention in plain PyTorch: the reference of :mod:`.triton`, and the CPU path.

Both share the argument checks of :func:`check_paged_decode_inputs` and the gather of the
selected keys/values of :func:`gather_selected`, which the tests also use to run dense SDPA on
exactly the keys the kernel reads.
"""

from __future__ import annotations

import torch

from ...checks import check_int, is_finite_number

__all__ = ["check_paged_decode_inputs", "gather_selected", "paged_decode_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_int32(name: str, x, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")


def check_paged_decode_inputs(
    q, k_pages, v_pages, page_table, seq_lens, selected, selected_counts, *, select_block: int, scale
) -> float:
    """Validate the paged decode arguments (shapes, dtypes, devices); return the scale to use.

    Shapes: q ``(B, Hq, D)``, k_pages / v_pages ``(num_pages, Hkv, P, D)``, page_table
    ``(B, max_pages)`` int32, seq_lens ``(B,)`` int32, selected ``(B, Hkv, max_sel)`` int32,
    selected_counts ``(B, Hkv)`` int32. ``select_block`` (tokens per entry of ``selected``) must
    divide the page size. Values inside the index tensors are not read here (that would cost a
    device sync per step); :func:`gather_selected` documents what they must hold.
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if q.dim() != 3:
        raise ValueError(f"q must have 3 dimensions (batch, q_heads, head_dim), got shape {tuple(q.shape)}")
    batch, q_heads, dim = q.shape
    for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(pages, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(pages).__name__}")
        if pages.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {pages.dtype}")
        if pages.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dimensions (num_pages, kv_heads, page_size, head_dim), got shape {tuple(pages.shape)}"
            )
        if pages.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {pages.device}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages must have k_pages' shape {tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
    _, kv_heads, page_size, page_dim = k_pages.shape
    if page_dim != dim:
        raise ValueError(f"k_pages must have q's head_dim {dim}, got {page_dim}")
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(
            f"the number of query heads ({q_heads}) must be a positive multiple of the KV heads ({kv_heads})"
        )
    if batch == 0 or dim == 0 or page_size == 0:
        raise ValueError(
            f"q and k_pages need a nonzero batch, head_dim and page size; got {tuple(q.shape)}, {tuple(k_pages.shape)}"
        )
    check_int("select_block", select_block)
    if page_size % select_block:
        raise ValueError(f"select_block ({select_block}) must divide the page size ({page_size})")
    _check_int32("page_table", page_table, 2)
    _check_int32("seq_lens", seq_lens, 1)
    _check_int32("selected", selected, 3)
    _check_int32("selected_counts", selected_counts, 2)
    expected = {
        "page_table": (batch, None),
        "seq_lens": (batch,),
        "selected": (batch, kv_heads, None),
        "selected_counts": (batch, kv_heads),
    }
    tensors = {"page_table": page_table, "seq_lens": seq_lens, "selected": selected, "selected_counts": selected_counts}
    for name, shape in expected.items():
        got = tensors[name].shape
        if any(want is not None and want != size for want, size in zip(shape, got, strict=True)):
            wanted = ", ".join("*" if want is None else str(want) for want in shape)
            raise ValueError(
                f"{name} must have shape ({wanted}{',' * (len(shape) == 1)}) (batch, kv_heads from q and k_pages), "
                f"got {tuple(got)}"
            )
        if tensors[name].device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {tensors[name].device}")
    if scale is None:
        return dim**-0.5
    if not is_finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return float(scale)


def gather_selected(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    selected_counts: torch.Tensor,
    *,
    select_block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The keys and values the selection names, ``(keys, values, valid, positions)``.

    Entry ``e < selected_counts[b, h]`` of ``selected[b, h]`` names the ``select_block`` tokens
    ``selected[b, h, e] * select_block + [0, select_block)`` of sequence ``b`` (logical token
    positions; a page is ``select_block == P``). Token ``t`` lives in physical page
    ``page_table[b, t // P]`` at row ``t % P``. Tokens at or past ``seq_lens[b]`` are not valid
    (the partial last page). Entries must name distinct blocks with
    ``selected[b, h, e] * select_block < max_pages * P``; entries past the count are ignored.

    Returns keys/values ``(B, Hkv, max_sel * select_block, D)`` in the pages' dtype, ``valid``
    bool and ``positions`` int64 of shape ``(B, Hkv, max_sel * select_block)``.
    """
    batch, kv_heads, max_sel = selected.shape
    page_size = k_pages.shape[2]
    within = torch.arange(select_block, device=selected.device)
    positions = (selected.long()[..., None] * select_block + within).reshape(batch, kv_heads, -1)
    entry = torch.arange(max_sel, device=selected.device).repeat_interleave(select_block)
    valid = (entry < selected_counts[..., None].long()) & (positions < seq_lens.long()[:, None, None])
    safe = torch.where(valid, positions, 0)
    physical = torch.gather(page_table.long(), 1, (safe // page_size).reshape(batch, -1)).reshape(safe.shape)
    heads = torch.arange(kv_heads, device=selected.device)[None, :, None]
    keys = k_pages[physical, heads, safe % page_size]
    values = v_pages[physical, heads, safe % page_size]
    return keys, values, valid, positions


def paged_decode_reference(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per sequence against the selected tokens of its paged KV cache.

    Arguments as in :func:`sparse_attn.ops.paged_decode.paged_decode`. Returns ``out``
    ``(B, Hq, D)`` in q's dtype and ``lse`` float32 ``(B, Hq)`` (natural log). A (sequence, KV
    head) with no valid selected token gives zeros and an LSE of ``-inf`` for its query heads.
    Memory: the selected keys and values of the batch, gathered once.
    """
    batch, q_heads, dim = q.shape
    kv_heads = k_pages.shape[1]
    group = q_heads // kv_heads
    keys, values, valid, _ = gather_selected(
        k_pages, v_pages, page_table, seq_lens, selected, selected_counts, select_block=select_block
    )
    grouped_q = q.float().view(batch, kv_heads, group, dim)
    scores = torch.einsum("bhgd,bhnd->bhgn", grouped_q, keys.float()) * scale
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with nothing to attend to: weights 0 (not NaN), so the output is 0 and the LSE -inf.
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.einsum("bhgn,bhnd->bhgd", weights, values.float())
    return out.reshape(batch, q_heads, dim).to(q.dtype), lse.reshape(batch, q_heads)
