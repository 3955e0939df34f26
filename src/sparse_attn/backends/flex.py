"""FlexAttention backend: PyTorch's compiled FlexAttention driven by the plan as a ``BlockMask``.

The "what users would pick instead" baseline on GPU; on CPU it runs only when asked for by
name (``auto`` takes the reference backend there: see :mod:`sparse_attn.backends`). The
compiled function is created once; ``torch.compile`` then specializes once per shape (the
``mask_mod`` objects are cached per geometry so they never force a recompile).

The ``BlockMask`` is made from the pattern's plan (:mod:`sparse_attn.plan`): its full blocks go
to the ``full_kv_*`` lists (no ``mask_mod`` evaluated), the partial ones (diagonal blocks,
sequence tails) carry the causal / bounds ``mask_mod``, and a pattern's token rule
(:class:`sparse_attn.masked_pattern.MaskedPattern`) joins it there. It is built once per (pattern, causal,
query heads) and cached on the pattern.

Dynamo's default of 8 specializations per function is too few for a library called at
many lengths, and past it Dynamo silently runs FlexAttention *eagerly*, which
materializes the full score matrix (and, in PyTorch 2.13, mishandles sequence tails).
So calls raise the limit and turn "limit hit" into an error, which this backend answers
by falling back to the reference backend with a warning.

NaN/Inf: on CPU, FlexAttention's kernel does not propagate non-finite inputs as SDPA does, so
inputs holding any run on the reference backend (one warning; see
:func:`sparse_attn.block_sparse_attention` for the behaviour every backend follows).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

from ..masked_pattern import token_rule_of
from ..pattern import BlockSparsePattern
from ..plan import BlockSparsePlan, plan_for
from . import reference

name = "flex"

_SPECIALIZATION_LIMIT = 64


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str | None:
    """Why FlexAttention cannot run this case, or ``None`` when it can."""
    if q.device.type == "cpu" and return_lse:
        return "FlexAttention on CPU cannot return the log-sum-exp"
    if q.device.type not in ("cpu", "cuda"):
        return f"FlexAttention does not run on {q.device.type}"
    if q.dtype == torch.float64:
        return "FlexAttention does not take float64"
    if q.device.type == "cuda" and (pattern.block_q % 16 or pattern.block_k % 16):
        return "FlexAttention on CUDA needs block sizes that are multiples of 16"
    if q.device.type == "cpu" and not all(bool(torch.isfinite(x).all()) for x in (q, k, v)):
        # Its CPU kernel leaves rows that read a NaN finite (and poisons others): one pass on
        # the host finds such inputs, and the reference backend, which propagates them as SDPA
        # does, runs them.
        return "the inputs hold NaN or Inf, which FlexAttention on CPU does not propagate as SDPA does"
    return None


@functools.cache
def _bounds_mask_mod(offset: int, seq_k: int, causal: bool):
    """One ``mask_mod`` object per (offset, seq_k, causal), so compiled FlexAttention is reused across calls."""
    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx + offset >= kv_idx) & (kv_idx < seq_k)

    else:

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < seq_k

    return mask_mod


def _with_token_rule(mask_mod, rule, offset: int):
    """``mask_mod`` and the pattern's token rule (queries at absolute positions ``q_idx + offset``)."""

    def masked(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & rule.allowed(q_idx + offset, kv_idx)

    return masked


def _split_lists(counts, indices, is_full):
    """Each sorted list split into its full entries and its partial ones (both sorted), as
    ``(full_counts, full_indices, partial_counts, partial_indices)``; ``is_full`` is bool, ``indices``' shape."""
    slots = torch.arange(indices.shape[-1], device=indices.device)
    used = slots < counts[..., None]
    full = is_full & used
    # A stable sort puts the chosen entries first and keeps their ascending order.
    full_first = torch.sort((~full).to(torch.uint8), dim=-1, stable=True).indices
    partial_first = torch.sort((~(used & ~full)).to(torch.uint8), dim=-1, stable=True).indices
    full_counts = full.sum(-1, dtype=torch.int32)
    partial_counts = counts - full_counts
    full_indices = torch.where(slots < full_counts[..., None], torch.gather(indices, -1, full_first), 0)
    partial_indices = torch.where(slots < partial_counts[..., None], torch.gather(indices, -1, partial_first), 0)
    return full_counts, full_indices, partial_counts, partial_indices


def block_mask(plan: BlockSparsePlan, *, num_q_heads: int | None = None):
    """FlexAttention ``BlockMask`` computing exactly the plan's pattern.

    ``num_q_heads`` expands a per-KV-head pattern to the query heads (FlexAttention takes one
    list per query head, or one for all). A pattern's token rule joins the ``mask_mod``, and the
    blocks it cuts are partial even where the plan counts them full.
    """
    from torch.nn.attention.flex_attention import BlockMask

    pattern = plan.pattern
    counts, indices, full_counts = pattern.kv_counts, pattern.kv_indices, plan.full_counts
    rule = token_rule_of(pattern)
    slots = torch.arange(pattern.max_kv, device=pattern.device)
    if rule is None:
        # Full entries lead each sorted list; the partial ones follow them.
        full_indices = torch.where(slots < full_counts[..., None], indices, 0)
        partial_counts = counts - full_counts
        shifted = torch.clamp(slots + full_counts[..., None].long(), max=pattern.max_kv - 1)
        partial_indices = torch.where(slots < partial_counts[..., None], torch.gather(indices, -1, shifted), 0)
    else:
        # The rule's partial entries can sit anywhere in a list: split by flags instead.
        is_full = (slots < full_counts[..., None]) & ~pattern.rule_partial
        full_counts, full_indices, partial_counts, partial_indices = _split_lists(counts, indices, is_full)
    if num_q_heads is not None and num_q_heads != pattern.num_heads:
        group = num_q_heads // pattern.num_heads
        lists = (full_counts, full_indices, partial_counts, partial_indices)
        full_counts, full_indices, partial_counts, partial_indices = (x.repeat_interleave(group, dim=1) for x in lists)

    def padded(selected: torch.Tensor) -> torch.Tensor:
        width = pattern.num_kv_blocks
        out = torch.zeros((*selected.shape[:3], width), dtype=torch.int32, device=pattern.device)
        keep = min(width, selected.shape[-1])
        out[..., :keep] = selected[..., :keep]
        return out

    offset = pattern.seq_k - pattern.seq_q
    mask_mod = _bounds_mask_mod(offset, pattern.seq_k, plan.causal)
    if rule is not None:
        mask_mod = _with_token_rule(mask_mod, rule, offset)
    return BlockMask.from_kv_blocks(
        partial_counts.contiguous(),
        padded(partial_indices),
        full_counts.contiguous(),
        padded(full_indices),
        BLOCK_SIZE=(pattern.block_q, pattern.block_k),
        mask_mod=mask_mod,
        seq_lengths=(pattern.seq_q, pattern.seq_k),
    )


def _kernel_options(q: torch.Tensor, pattern: BlockSparsePattern) -> dict | None:
    if q.device.type != "cuda":
        return None
    if q.dtype == torch.float32 and q.shape[-1] > 128:
        # float32 tiles at head_dim 256 overflow shared memory unless they are small.
        return {"BLOCK_M": min(pattern.block_q, 32), "BLOCK_N": min(pattern.block_k, 32)}
    # Flex's CUDA kernel tiles must divide the block mask's blocks; its defaults are 128.
    if pattern.block_q >= 128 and pattern.block_k >= 128:
        return None
    return {"BLOCK_M": min(pattern.block_q, 128), "BLOCK_N": min(pattern.block_k, 128)}


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool = False,
):
    """Block-sparse attention through FlexAttention. Shapes as in :func:`sparse_attn.block_sparse_attention`."""
    return attend(
        q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse, kernel_options=_kernel_options(q, pattern)
    )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool,
    scale: float,
    return_lse: bool,
    kernel_options: dict | None,
    on_recompile_limit: tuple[str, Callable] | None = None,
):
    """:func:`forward` with FlexAttention's ``kernel_options`` given (``{"BACKEND": "FLASH"}``
    is the :mod:`.flash4` backend); the plan's ``BlockMask`` and the compiled function are shared.
    ``on_recompile_limit``: ``(name, run)`` to call as ``run(q, k, v, pattern, causal=, scale=,
    return_lse=)`` once the compile limit is hit (default: the reference backend)."""
    expand = pattern.num_heads not in (1, q.shape[1])
    num_q_heads = q.shape[1] if expand else None
    # Built once per pattern and reused by later calls (building it costs a few kernels).
    key = ("flex_block_mask", bool(causal), num_q_heads)
    mask = pattern.cached_plan(key)
    if mask is None:
        mask = pattern.store_plan(key, block_mask(plan_for(pattern, causal=causal), num_q_heads=num_q_heads))
    flex = _compiled_flex_attention()
    group = q.shape[1] // k.shape[1]
    limits = dict(
        recompile_limit=_SPECIALIZATION_LIMIT,
        accumulated_recompile_limit=8 * _SPECIALIZATION_LIMIT,
        fail_on_recompile_limit_hit=True,
    )
    try:
        with torch._dynamo.config.patch(**limits):
            result = flex(
                q,
                k,
                v,
                block_mask=mask,
                scale=scale,
                enable_gqa=group > 1,
                return_lse=return_lse,
                kernel_options=kernel_options,
            )
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        fallback_name, fallback = on_recompile_limit or ("reference", reference.forward)
        warnings.warn(
            f"FlexAttention was compiled for more than {_SPECIALIZATION_LIMIT} shapes: using the {fallback_name} backend",
            stacklevel=3,
        )
        return fallback(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
    if return_lse:
        out, lse = result
        return out, lse.float()
    return result


def gradient_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why this backend cannot differentiate this case, or ``None``: FlexAttention has its own
    backward (autograd through the compiled call) on CUDA, and none on CPU."""
    if q.device.type != "cuda":
        return "inputs require grad and FlexAttention has no backward pass on CPU"
    return None
