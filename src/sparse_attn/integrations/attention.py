"""The attention function registered in transformers' ``AttentionInterface``: a thin adapter.

For a long prefill (query length ``>= min_seq_len``) that got a :class:`PrefillMask`, each
layer runs what its :class:`LayerPlan` says, on each batch row's real tokens:

- a full-attention layer runs the method's estimator and the block-sparse backend, or
  exact causal SDPA when it is in ``dense_layers``;
- a sliding-window layer whose window is shorter than the keys runs exact windowed
  attention in ``O(S * window)``, whatever the method: it is already sparse.

A decode step whose cache is a :class:`~.decode.SparseDecodeCache` on a model patched with a
``decode_method`` runs that method over the cache's pages (:func:`~.decode.decode_step_attention`).
Everything else calls transformers' own SDPA function with transformers' own mask, and
active recorders count it with the reason.
"""

from __future__ import annotations

import warnings

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..api import block_sparse_attention, estimate
from ..backends.dense import causal_attention, sliding_window_attention
from ..registry import HEAD_METHODS
from ..utils import synchronized_now
from .decode import calibration_step, decode_step_attention
from .masks import PrefillMask
from .records import WHOLE_BATCH, LayerRecord, pattern_head_density, window_density
from .state import ATTENTION_NAME, PLAN_ATTRIBUTE, LayerPlan

__all__ = ["sparse_attention_forward"]


def _attend_row(
    plan: LayerPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float, row: int
) -> torch.Tensor:
    """One row (or the whole unpadded batch) of a long prefill, recorded when a recorder is active."""
    state = plan.state
    recording = bool(state.recorders)
    seq_q, seq_k = q.shape[2], k.shape[2]
    head_density: tuple[float, ...] = ()
    head_methods: tuple[str, ...] = ()
    estimate_ms = 0.0
    if window is not None and window < seq_k:
        kind, method = "window", f"window={window}"
        out = sliding_window_attention(q, k, v, window=window, scale=scale)
        if recording:
            head_density = (window_density(seq_q, seq_k, window),)
    elif plan.method is None:
        kind, method = "dense", "sdpa"
        out = causal_attention(q, k, v, scale=scale)
        head_density = (1.0,)
    else:
        kind, method = "sparse", plan.method
        start = synchronized_now(q.device) if recording else 0.0
        with torch.autocast(q.device.type, enabled=False):  # estimators compute their scores in float32
            pattern = estimate(q, k, plan.method, block_q=state.block_q, block_k=state.block_k, **plan.options)
        if recording:
            estimate_ms = (synchronized_now(q.device) - start) * 1e3
            head_density = pattern_head_density(pattern)
            chosen = pattern.cached_plan(HEAD_METHODS)
            head_methods = tuple(chosen[0]) if chosen else ()  # a whole batch: its first sequence
        out = block_sparse_attention(q, k, v, pattern, scale=scale, backend=state.backend)
    if recording:
        entry = LayerRecord(plan.layer, row, kind, method, seq_q, seq_k, head_density, estimate_ms, head_methods)
        for recorder in state.recorders:
            recorder.records.append(entry)
            if recorder.capture and kind != "window":
                recorder.tensors[(plan.layer, row)] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
    return out


def _prefill_attention(
    plan: LayerPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PrefillMask, scale: float
) -> torch.Tensor:
    """A long prefill, row by row when padded. Returns ``(B, Hq, Sq, D)``."""
    spans = mask.row_spans()
    if spans is None:
        return _attend_row(plan, q, k, v, mask.window, scale, row=WHOLE_BATCH)
    offset = k.shape[2] - q.shape[2]
    out = q.new_zeros(q.shape)
    for row, (start, end) in enumerate(spans):
        # Queries are the last Sq key positions: those inside [start, end) are this row's real ones.
        q_start, q_end = max(start - offset, 0), end - offset
        if q_end <= q_start:
            continue
        rows = slice(row, row + 1)
        out[rows, :, q_start:q_end] = _attend_row(
            plan, q[rows, :, q_start:q_end], k[rows, :, start:end], v[rows, :, start:end], mask.window, scale, row
        )
    return out


def _sdpa_reason(plan: LayerPlan, seq_q: int, long_prefill: bool) -> str:
    """Why a call runs transformers' SDPA, as a recorder counts it."""
    if long_prefill:
        return "prefill whose mask is not plain causal or sliding-window (custom mask, static cache) or with dropout"
    if seq_q == 1:
        return "decode step (one query token; decode steps always run SDPA)"
    return (
        f"prefill of {seq_q} tokens is shorter than min_seq_len={plan.state.min_seq_len} "
        "(give a longer prompt or patch with a smaller min_seq_len)"
    )


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in the dtype attention computes in under autocast: the autocast dtype when autocast is on
    for their device (as SDPA, on autocast's lower-precision list, would cast them; under
    ``torch.autocast`` a model's RoPE leaves q and k in float32 beside a 16-bit v), else unchanged."""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return tuple(x if x.dtype == dtype else x.to(dtype) for x in (q, k, v))
    return q, k, v


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query ``(B, Hq, L, D)``, key/value ``(B, Hkv, Sk, D)``.

    Returns ``(out (B, L, Hq, D), None)``.
    """
    plan = getattr(module, PLAN_ATTRIBUTE, None)
    if plan is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attn_implementation={ATTENTION_NAME!r} but was not patched; "
            "call sparse_attn.patch(model, ...) instead of set_attn_implementation"
        )
    if plan.state.calibration is not None:
        calibration_step(plan, query, key)
    paged = plan.state.pending_decode.pop(plan.layer, None)
    if paged is not None:  # a decode step whose keys and values a SparseDecodeCache keeps in pages
        window = kwargs.get("sliding_window")
        return decode_step_attention(plan, query, paged, attention_mask, scaling, window), None
    long_prefill = query.shape[2] >= plan.state.min_seq_len
    if isinstance(attention_mask, PrefillMask):
        if long_prefill and dropout == 0.0:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = _prefill_attention(plan, *autocast_inputs(query, key, value), attention_mask, scale)
            return out.transpose(1, 2).contiguous(), None
        attention_mask = attention_mask.dense()
    if long_prefill:
        warnings.warn(
            "sparse_attn: a long prefill ran dense SDPA because its mask is not plain causal or sliding-window "
            "(custom mask function, static cache) or dropout is on",
            stacklevel=2,
        )
    for recorder in plan.state.recorders:
        recorder.sdpa_calls[_sdpa_reason(plan, query.shape[2], long_prefill)] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
