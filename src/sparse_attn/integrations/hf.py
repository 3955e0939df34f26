"""Hugging Face transformers integration: ``patch``, ``unpatch`` and ``record`` for causal LMs.

``patch(model, method=...)`` registers one attention function and one mask function under
the name ``"sparse_attn"`` in transformers' ``AttentionInterface`` and
``AttentionMaskInterface``, and switches the model to it with ``set_attn_implementation``.

How each attention call is computed:

* Long prefill (query length ``>= min_seq_len``) of a plain causal or sliding-window layout:
  the mask function returns a :class:`PrefillMask` (the padding, the window, and the
  arguments to build the dense mask if needed) instead of an ``O(S^2)`` tensor. Then

  - full-attention layers run the chosen method's estimator and the block-sparse backend;
    layers listed in ``dense_layers`` run exact causal SDPA;
  - sliding-window layers run exact windowed attention in ``O(S * window)``
    (:func:`sliding_window_attention`), whatever the method: they are already sparse.

* Everything else (decode steps, short prompts, dropout, custom mask functions, static
  caches) builds transformers' own SDPA mask and calls transformers' own SDPA function, so
  it is exactly what the unpatched model computes.

Padding. Each row's unmasked keys must form one contiguous span (left or right padding).
The prefill paths then compute each row on its own span; outputs at padded query
positions are zero. A mask with holes inside a row raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..api import DEFAULT_BLOCK, block_sparse_attention, estimate
from ..registry import get_method

ATTENTION_NAME = "sparse_attn"
DEFAULT_MIN_SEQ_LEN = 4096
# Queries per windowed-SDPA call: large enough to keep launches few on a GPU, small
# enough that the (chunk, chunk + window) score tile stays cheap.
_MIN_WINDOW_CHUNK = 1024
# Query rows sampled to check that a mask function is the plain causal / sliding one.
_PROBE_ROWS = 16
_PLAN_ATTRIBUTE = "_sparse_attn_plan"
_STATE_ATTRIBUTE = "_sparse_attn_state"


# ----------------------------------------------------------------------------------------
# Settings attached to a patched model and its attention modules
# ----------------------------------------------------------------------------------------
@dataclass
class PatchState:
    """What ``patch`` set on a model: shared by all its attention modules."""

    original_implementation: str
    min_seq_len: int
    backend: str
    block_q: int
    block_k: int
    recorders: list["Recorder"] = field(default_factory=list)


@dataclass(frozen=True)
class LayerPlan:
    """How one attention layer runs a long prefill: ``method`` ``None`` means exact dense SDPA."""

    layer: int
    method: str | None
    options: Mapping
    state: PatchState


@dataclass(eq=False)
class PrefillMask:
    """Stands in for the dense mask of a long prefill with a plain causal (or sliding) layout.

    Attributes:
        key_padding: bool ``(B, Sk)``, True for real tokens, aligned with the key tensor the
            attention function receives; ``None`` when no token is padded.
        window: the sliding window (a key is visible when ``query_pos - window < key_pos <= query_pos``),
            ``None`` for full causal attention.
        sdpa_arguments: the arguments of ``transformers.masking_utils.sdpa_mask`` that build
            the equivalent dense mask, for layers that fall back to SDPA.
    """

    key_padding: torch.Tensor | None
    window: int | None
    sdpa_arguments: dict
    _dense: list = field(default_factory=list, repr=False)

    def dense(self) -> torch.Tensor | None:
        """transformers' SDPA mask for the same call (built once, shared by the layers)."""
        if not self._dense:
            from transformers.masking_utils import sdpa_mask

            self._dense.append(sdpa_mask(**self.sdpa_arguments))
        return self._dense[0]

    def row_spans(self) -> list[tuple[int, int]] | None:
        """Per batch row, the ``[start, end)`` span of real keys; ``None`` when nothing is padded.

        Raises ``ValueError`` when a row's real tokens are not contiguous.
        """
        if self.key_padding is None:
            return None
        padding = self.key_padding
        positions = torch.arange(padding.shape[1], device=padding.device)
        counts = padding.sum(dim=1)
        starts = torch.where(counts > 0, padding.int().argmax(dim=1), 0)
        ends = starts + counts
        contiguous = (positions >= starts[:, None]) & (positions < ends[:, None])
        if not bool((contiguous == padding).all()):
            raise ValueError(
                "sparse_attn: attention_mask has padding inside a sequence; only left or right padding "
                "(one contiguous span of real tokens per row) is supported. Pad with tokenizer.padding_side='left'."
            )
        return list(zip(starts.tolist(), ends.tolist()))


# ----------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRecord:
    """One attention layer's prefill on one batch row.

    ``kind`` is ``"sparse"`` (a method's pattern), ``"dense"`` (exact causal SDPA) or
    ``"window"`` (exact sliding window). ``row`` is the batch row, or -1 when the whole
    unpadded batch ran at once. ``head_density`` holds, per pattern head, the
    computed blocks over causally valid blocks (for ``"window"``: visible token pairs over
    causal token pairs, the same for every head).
    """

    layer: int
    row: int
    kind: str
    method: str
    seq_q: int
    seq_k: int
    head_density: tuple[float, ...]
    estimate_ms: float

    @property
    def density(self) -> float:
        return sum(self.head_density) / len(self.head_density)


@dataclass
class Recorder:
    """Collects a :class:`LayerRecord` for each long-prefill attention call while active.

    With ``capture=True`` it also keeps copies of the post-RoPE query, key and value that each
    non-window layer (global / dense / sparse) received, in ``tensors[(layer, row)]`` as
    ``(q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v)``: real inputs for studying estimators.
    """

    records: list[LayerRecord] = field(default_factory=list)
    capture: bool = False
    tensors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """One dict per record, with the mean density added (JSON-ready)."""
        return [
            {
                "layer": r.layer,
                "row": r.row,
                "kind": r.kind,
                "method": r.method,
                "seq_q": r.seq_q,
                "seq_k": r.seq_k,
                "density": r.density,
                "head_density": list(r.head_density),
                "estimate_ms": r.estimate_ms,
            }
            for r in self.records
        ]

    def table(self) -> str:
        """A printable per-layer table: kind, method, lengths, mean and per-head density, estimate time."""
        header = f"{'layer':>5} {'row':>3} {'kind':<6} {'method':<12} {'seq_q':>6} {'seq_k':>6} {'density':>7}  {'est ms':>7}  per-head density"
        lines = [header, "-" * len(header)]
        for r in sorted(self.records, key=lambda r: (r.layer, r.row)):
            heads = " ".join(f"{d:.2f}" for d in r.head_density)
            lines.append(
                f"{r.layer:>5} {r.row:>3} {r.kind:<6} {r.method:<12} {r.seq_q:>6} {r.seq_k:>6} "
                f"{r.density:>7.3f}  {r.estimate_ms:>7.2f}  {heads}"
            )
        return "\n".join(lines)


@contextlib.contextmanager
def record(model, *, capture: bool = False) -> Iterator[Recorder]:
    """``with record(model) as rec:`` collects per-layer, per-head density and estimation time.

    Only long prefills (the patched paths) are recorded; timings synchronize the device.
    ``capture=True`` also keeps the q, k, v of every non-window layer (see :class:`Recorder`);
    they are copies, so memory grows by the layers' activations.
    """
    state = _state_of(model)
    recorder = Recorder(capture=capture)
    state.recorders.append(recorder)
    try:
        yield recorder
    finally:
        state.recorders.remove(recorder)


def _synchronized_now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _pattern_head_density(pattern) -> tuple[float, ...]:
    valid = int(pattern.causal_block_mask().sum()) * pattern.batch
    kept = pattern.kv_counts.sum(dim=(0, 2), dtype=torch.int64)
    return tuple((kept.double() / valid).tolist())


def _window_density(seq_q: int, seq_k: int, window: int) -> float:
    """Visible over causal token pairs for queries at positions ``seq_k - seq_q .. seq_k - 1``."""
    visible_keys = torch.arange(seq_k - seq_q + 1, seq_k + 1, dtype=torch.float64)
    return float(visible_keys.clamp(max=window).sum() / visible_keys.sum())


# ----------------------------------------------------------------------------------------
# Attention computations (q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D); queries are the last Sq positions)
# ----------------------------------------------------------------------------------------
def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, chunk: int | None = None
) -> torch.Tensor:
    """Exact causal sliding-window attention: query at position ``p`` sees keys in ``(p - window, p]``.

    Runs SDPA over chunks of ``chunk`` queries against only their window's key span, so
    compute and memory are ``O(Sq * (chunk + window))`` instead of ``O(Sq * Sk)``.
    Returns ``(B, Hq, Sq, D)`` in q's dtype.
    """
    seq_q, seq_k = q.shape[2], k.shape[2]
    offset = seq_k - seq_q
    group = q.shape[1] // k.shape[1]
    chunk = chunk or max(window, _MIN_WINDOW_CHUNK)
    out = q.new_empty(q.shape)
    for start in range(0, seq_q, chunk):
        stop = min(start + chunk, seq_q)
        first_key, end_key = max(offset + start - window + 1, 0), offset + stop
        query_position = torch.arange(offset + start, offset + stop, device=q.device)[:, None]
        key_position = torch.arange(first_key, end_key, device=q.device)[None, :]
        visible = (key_position <= query_position) & (key_position > query_position - window)
        # Expanding K/V over the GQA group only for this small span keeps SDPA on a fused kernel.
        keys = k[:, :, first_key:end_key].repeat_interleave(group, dim=1)
        values = v[:, :, first_key:end_key].repeat_interleave(group, dim=1)
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            q[:, :, start:stop], keys, values, attn_mask=visible, scale=scale
        )
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Exact causal SDPA with queries at the last ``Sq`` key positions; ``(B, Hq, Sq, D)``."""
    seq_q, seq_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if seq_q == seq_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns to the top-left corner; chunked prefill needs bottom-right.
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(diagonal=seq_k - seq_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)


def _attend_row(
    plan: LayerPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float, row: int
) -> torch.Tensor:
    """One row (or the whole unpadded batch) of a long prefill, recorded when a recorder is active."""
    state = plan.state
    recording = bool(state.recorders)
    seq_q, seq_k = q.shape[2], k.shape[2]
    head_density: tuple[float, ...] = ()
    estimate_ms = 0.0
    if window is not None and window < seq_k:
        kind, method = "window", f"window={window}"
        out = sliding_window_attention(q, k, v, window=window, scale=scale)
        if recording:
            head_density = (_window_density(seq_q, seq_k, window),)
    elif plan.method is None:
        kind, method = "dense", "sdpa"
        out = causal_attention(q, k, v, scale=scale)
        head_density = (1.0,)
    else:
        kind, method = "sparse", plan.method
        start = _synchronized_now(q.device) if recording else 0.0
        pattern = estimate(q, k, plan.method, block_q=state.block_q, block_k=state.block_k, **plan.options)
        if recording:
            estimate_ms = (_synchronized_now(q.device) - start) * 1e3
            head_density = _pattern_head_density(pattern)
        out = block_sparse_attention(q, k, v, pattern, scale=scale, backend=state.backend)
    if recording:
        entry = LayerRecord(plan.layer, row, kind, method, seq_q, seq_k, head_density, estimate_ms)
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
        return _attend_row(plan, q, k, v, mask.window, scale, row=-1)
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


# ----------------------------------------------------------------------------------------
# The functions registered in transformers
# ----------------------------------------------------------------------------------------
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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = getattr(module, _PLAN_ATTRIBUTE, None)
    if plan is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attn_implementation={ATTENTION_NAME!r} but was not patched; "
            "call sparse_attn.patch(model, ...) instead of set_attn_implementation"
        )
    long_prefill = query.shape[2] >= plan.state.min_seq_len
    if isinstance(attention_mask, PrefillMask):
        if long_prefill and dropout == 0.0:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = _prefill_attention(plan, query, key, value, attention_mask, scale)
            return out.transpose(1, 2).contiguous(), None
        attention_mask = attention_mask.dense()
    if long_prefill:
        warnings.warn(
            "sparse_attn: a long prefill ran dense SDPA because its mask is not plain causal or sliding-window "
            "(custom mask function, static cache) or dropout is on",
            stacklevel=2,
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _follows_plain_layout(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, window, device) -> bool:
    """Whether ``mask_function`` is plain causal (with ``window`` when given) on sampled query rows."""
    query_rows = torch.linspace(0, q_length - 1, steps=min(q_length, _PROBE_ROWS), device=device).round().long()
    batch = torch.arange(batch_size, device=device)[:, None, None, None]
    head = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    query = (query_rows + q_offset)[None, None, :, None]
    key = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    expected = key <= query
    if window is not None:
        expected = expected & (key > query - window)
    return bool((mask_function(batch, head, query, key) == expected).all())


def sparse_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
):
    """transformers mask function: a :class:`PrefillMask` for plain prefills, else transformers' SDPA mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = mask_function or causal_mask_function
    arguments = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        use_vmap=use_vmap,
        device=device,
        **kwargs,
    )
    # Custom mask functions (image tokens, packed sequences, blocks) set use_vmap or forbid the
    # causal skip; static caches put queries before the end of the key buffer. Those stay dense.
    plain = (
        q_length > 1
        and allow_is_causal_skip
        and not use_vmap
        and int(q_offset) + q_length == kv_offset + kv_length
        and _follows_plain_layout(mask_function, batch_size, q_length, kv_length, int(q_offset), kv_offset, local_size, device)
    )
    if not plain:
        return sdpa_mask(**arguments)
    key_padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if key_padding is not None:
        key_padding = key_padding[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
        if bool(key_padding.all()):
            key_padding = None
    return PrefillMask(key_padding=key_padding, window=local_size, sdpa_arguments=arguments)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sparse_attention_mask)


# ----------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------
def _attention_modules(model) -> dict[int, torch.nn.Module]:
    """Self-attention modules by layer index (transformers names them ``*Attention`` with a ``layer_idx``)."""
    modules = {
        module.layer_idx: module
        for module in model.modules()
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int)
    }
    if not modules:
        raise ValueError(f"found no attention modules with a layer_idx in {type(model).__name__}")
    for module in modules.values():
        if getattr(module, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"{type(module).__name__} uses attention logit soft-capping, which sparse_attn does not support")
        if not getattr(module, "is_causal", True):
            raise ValueError(f"{type(module).__name__} is not causal; sparse_attn.patch supports causal LMs only")
    return modules


def _method_and_options(value) -> tuple[str, dict]:
    if isinstance(value, str):
        return value, {}
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], Mapping):
        return value[0], dict(value[1])
    raise TypeError(f"a layer_methods entry must be a method name or (name, options), got {value!r}")


def _layer_plans(
    layers: list[int], method: str, options: dict, dense_layers, layer_methods, state: PatchState
) -> dict[int, LayerPlan]:
    known = set(layers)
    dense = set(dense_layers)
    overrides = {index: _method_and_options(value) for index, value in (layer_methods or {}).items()}
    unknown = sorted((dense | set(overrides)) - known)
    if unknown:
        raise ValueError(f"layer indices {unknown} are not attention layers of this model (layers {min(known)}..{max(known)})")
    plans = {}
    for layer in layers:
        name, layer_options = overrides.get(layer, (method, options))
        get_method(name).make_config(**layer_options)  # unknown methods and options fail here, not mid-forward
        plans[layer] = LayerPlan(layer, None if layer in dense else name, dict(layer_options), state)
    return plans


def _state_of(model) -> PatchState:
    state = getattr(model, _STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("model is not patched: call sparse_attn.patch(model, ...) first")
    return state


def patch(
    model,
    method: str = "xattention",
    *,
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN,
    dense_layers=(),
    layer_methods: Mapping | None = None,
    backend: str = "auto",
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    **options,
):
    """Make a transformers causal LM run ``method`` on long prefills. Returns the same model.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through ``AttentionInterface``.
        method: a registered method name (``sparse_attn.list_methods()``); ``options`` are its hyperparameters.
        min_seq_len: prefills with at least this many query tokens run the method; shorter ones
            and decode steps run transformers' SDPA.
        dense_layers: layer indices whose prefill stays exact (causal SDPA).
        layer_methods: per-layer overrides ``{layer: name}`` or ``{layer: (name, options)}``.
        backend: the block-sparse backend (``"auto"``, ``"triton"``, ``"flex"``, ``"reference"``).
        block_q, block_k: block sizes of the estimated patterns.

    Sliding-window layers always run exact windowed attention. Patching a patched model
    replaces its settings. ``unpatch`` restores the previous attention implementation.
    """
    if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int) or min_seq_len < 1:
        raise ValueError(f"min_seq_len must be a positive int, got {min_seq_len!r}")
    modules = _attention_modules(model)
    previous = getattr(model, _STATE_ATTRIBUTE, None)
    original = previous.original_implementation if previous else model.config._attn_implementation
    state = PatchState(original, min_seq_len, backend, block_q, block_k)
    plans = _layer_plans(sorted(modules), method, options, dense_layers, layer_methods, state)
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation (not AttentionInterface-based)")
    for layer, module in modules.items():
        setattr(module, _PLAN_ATTRIBUTE, plans[layer])
    setattr(model, _STATE_ATTRIBUTE, state)
    return model


def unpatch(model):
    """Restore the attention implementation the model had before ``patch``. Returns the same model."""
    state = _state_of(model)
    model.set_attn_implementation(state.original_implementation)
    for module in model.modules():
        if hasattr(module, _PLAN_ATTRIBUTE):
            delattr(module, _PLAN_ATTRIBUTE)
    delattr(model, _STATE_ATTRIBUTE)
    return model


__all__ = [
    "ATTENTION_NAME",
    "LayerRecord",
    "PrefillMask",
    "Recorder",
    "causal_attention",
    "patch",
    "record",
    "sliding_window_attention",
    "unpatch",
]
