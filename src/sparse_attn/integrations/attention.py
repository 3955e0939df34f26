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

Attention sinks (gpt-oss: a learned logit per query head, ``s_aux``, that joins every row's
softmax denominator with a zero value): the output of attention without the sink, ``O`` with
log-sum-exp ``L``, becomes ``O * sigmoid(L - sink)`` (``sum_j e^{s_j} / (sum_j e^{s_j} +
e^{sink})``), exactly, whatever the kept blocks. So a long prefill runs every path with
``return_lse`` (the windowed and dense layers as block patterns, the window's edges by its token
rule) and scales the rows; gradients reach the sinks through the sigmoid. Calls that fall back
run SDPA with one extra zero key and value whose additive mask entry is the head's sink (exact
too; the mask is ``(B, Hq, Sq, Sk + 1)``, as the model's own eager attention materialises its
weights). A ``decode_method`` does not take sinks: patching such a model with one raises.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..api import block_sparse_attention, estimate
from ..backends.dense import causal_attention, sliding_window_attention
from ..nn.nsa import causal_pattern, window_pattern
from ..registry import HEAD_METHODS
from ..utils import synchronized_now
from .decode import calibration_step, decode_step_attention
from .masks import PrefillMask
from .records import WHOLE_BATCH, LayerRecord, pattern_head_density, window_density
from .state import ATTENTION_NAME, PLAN_ATTRIBUTE, LayerPlan

__all__ = ["sparse_attention_forward"]


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention ``out`` ``(B, Hq, Sq, D)`` with log-sum-exp ``lse`` ``(B, Hq, Sq)`` as if each head's
    softmax had also held the logit ``sinks[h]`` with a zero value: ``out * sigmoid(lse - sink)``
    (a row that sees no key, ``lse = -inf``, gives 0, as the sink then takes all the weight)."""
    keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return (out.float() * keep[..., None]).to(out.dtype)


def _attend_row(
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    scale: float,
    row: int,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One row (or the whole unpadded batch) of a long prefill, recorded when a recorder is active.
    With ``sinks`` (one logit per query head) every path computes its log-sum-exp and the rows are
    scaled by :func:`with_sinks`."""
    state = plan.state
    recording = bool(state.recorders)
    seq_q, seq_k = q.shape[2], k.shape[2]
    head_density: tuple[float, ...] = ()
    head_methods: tuple[str, ...] = ()
    estimate_ms = 0.0
    lse = None
    if window is not None and window < seq_k:
        kind, method = "window", f"window={window}"
        if sinks is None:
            out = sliding_window_attention(q, k, v, window=window, scale=scale)
        else:  # the window as a block pattern with its token rule, for the log-sum-exp
            pattern = window_pattern(seq_q, seq_k, window, device=q.device)
            out, lse = block_sparse_attention(q, k, v, pattern, scale=scale, backend=state.backend, return_lse=True)
        if recording:
            head_density = (window_density(seq_q, seq_k, window),)
    elif plan.method is None:
        kind, method = "dense", "sdpa"
        if sinks is None:
            out = causal_attention(q, k, v, scale=scale)
        else:
            method = "dense pattern (sinks)"
            pattern = causal_pattern(seq_q, seq_k, q.device)  # cached per shape, as the window's
            out, lse = block_sparse_attention(q, k, v, pattern, scale=scale, backend=state.backend, return_lse=True)
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
        if sinks is None:
            out = block_sparse_attention(q, k, v, pattern, scale=scale, backend=state.backend)
        else:
            out, lse = block_sparse_attention(q, k, v, pattern, scale=scale, backend=state.backend, return_lse=True)
    if sinks is not None:
        out = with_sinks(out, lse, sinks)
    if recording:
        entry = LayerRecord(plan.layer, row, kind, method, seq_q, seq_k, head_density, estimate_ms, head_methods)
        for recorder in state.recorders:
            recorder.records.append(entry)
            if recorder.capture and kind != "window":
                recorder.tensors[(plan.layer, row)] = (q.detach().clone(), k.detach().clone(), v.detach().clone())
    return out


def _prefill_attention(
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: PrefillMask,
    scale: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """A long prefill, row by row when padded. Returns ``(B, Hq, Sq, D)``."""
    spans = mask.row_spans()
    if spans is None:
        return _attend_row(plan, q, k, v, mask.window, scale, row=WHOLE_BATCH, sinks=sinks)
    offset = k.shape[2] - q.shape[2]
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))  # v's head dim (multi-head latent attention)
    for row, (start, end) in enumerate(spans):
        # Queries are the last Sq key positions: those inside [start, end) are this row's real ones.
        q_start, q_end = max(start - offset, 0), end - offset
        if q_end <= q_start:
            continue
        rows = slice(row, row + 1)
        out[rows, :, q_start:q_end] = _attend_row(
            plan, q[rows, :, q_start:q_end], k[rows, :, start:end], v[rows, :, start:end], mask.window, scale, row,
            sinks,
        )  # fmt: skip
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
    sinks = kwargs.get("s_aux")  # attention sinks (gpt-oss): see the module docstring
    paged = plan.state.pending_decode.pop(plan.layer, None)
    if paged is not None:  # a decode step whose keys and values a SparseDecodeCache keeps in pages
        window = kwargs.get("sliding_window")
        return decode_step_attention(plan, query, paged, attention_mask, scaling, window), None
    long_prefill = query.shape[2] >= plan.state.min_seq_len
    if isinstance(attention_mask, PrefillMask):
        if long_prefill and dropout == 0.0:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = _prefill_attention(plan, *autocast_inputs(query, key, value), attention_mask, scale, sinks)
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
    if sinks is not None:
        return sdpa_with_sinks(query, key, value, attention_mask, sinks, dropout=dropout, scale=scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def sdpa_with_sinks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    sinks: torch.Tensor,
    *,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA with one attention-sink logit per query head: one more key and value, both zero, whose
    additive mask entry is the head's sink, so it joins each row's denominator and adds nothing to
    the output. ``attention_mask``: transformers' SDPA mask (bool, True = visible, or additive),
    or ``None`` for causal attention aligned to the last query (no mask at all for one query).
    Returns ``(B, Sq, Hq, D)`` as transformers' attention functions do."""
    batch, q_heads, seq_q, dim = query.shape
    seq_k = key.shape[2]
    dtype, device = query.dtype, query.device
    bias = torch.zeros(1, 1, seq_q, seq_k, dtype=dtype, device=device)
    if attention_mask is None:
        if seq_q > 1:
            causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(seq_k - seq_q)
            bias = bias.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        bias = bias.masked_fill(~attention_mask[..., :seq_k], float("-inf"))
    else:
        bias = bias + attention_mask[..., :seq_k].to(dtype)
    sink = sinks.to(dtype).view(1, q_heads, 1, 1).expand(batch, q_heads, seq_q, 1)
    bias = torch.cat([bias.expand(batch, q_heads, seq_q, seq_k), sink], dim=-1)
    group = q_heads // key.shape[1]
    zeros = key.new_zeros(key.shape[0], key.shape[1], 1, dim)
    key, value = (torch.cat([x, zeros], dim=2).repeat_interleave(group, dim=1) for x in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).contiguous()
