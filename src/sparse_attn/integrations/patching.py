"""``patch``, ``unpatch`` and ``record``: what a user calls on a transformers causal LM.

``patch(model, method=...)`` registers :func:`~.attention.sparse_attention_forward` and
:func:`~.masks.sparse_attention_mask` under the name ``"sparse_attn"`` in transformers'
``AttentionInterface`` and ``AttentionMaskInterface``, gives every attention module a
:class:`~.state.LayerPlan` (its method, or ``None`` for ``dense_layers``), and switches the
model to that implementation with ``set_attn_implementation``.

Padding. Each row's unmasked keys must form one contiguous span (left or right padding).
The prefill paths then compute each row on its own span; outputs at padded query
positions are zero. A mask with holes inside a row raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..api import DEFAULT_BLOCK
from ..checks import check_int
from ..decode import get_decode_method
from ..registry import get_method
from .attention import sparse_attention_forward
from .masks import sparse_attention_mask
from .records import Recorder
from .state import ATTENTION_NAME, PLAN_ATTRIBUTE, STATE_ATTRIBUTE, LayerPlan, PatchState, check_model, state_of

__all__ = ["DEFAULT_MIN_SEQ_LEN", "patch", "record", "unpatch"]

DEFAULT_MIN_SEQ_LEN = 4096


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
            raise ValueError(
                f"{type(module).__name__} uses attention logit soft-capping, which sparse_attn does not support"
            )
        if not getattr(module, "is_causal", True):
            raise ValueError(f"{type(module).__name__} is not causal; sparse_attn.patch supports causal LMs only")
    return modules


def _sliding_window_layers(config, layers: Iterable[int]) -> dict[int, int]:
    """The layers transformers gives a sliding-window mask, with their window, read from the config.

    Models with per-layer types (Gemma 3, Qwen 2/3) list them in ``config.layer_types``;
    models without that list (Mistral) slide on every layer when ``config.sliding_window`` is set.
    """
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return dict.fromkeys(layers, window)
    return {layer: window for layer in layers if layer_types[layer] == "sliding_attention"}


def _warn_about_sliding_layers(argument: str, named: set[int], sliding: dict[int, int], layers: list[int]) -> None:
    """``dense_layers`` / ``layer_methods`` naming a sliding-window layer: say it has no effect there."""
    hit = sorted(named & set(sliding))
    if not hit:
        return
    windows = sorted({sliding[layer] for layer in hit})
    full = [layer for layer in layers if layer not in sliding]
    warnings.warn(
        f"sparse_attn.patch: {argument} names sliding-window layer(s) {hit} (window {', '.join(map(str, windows))} "
        "tokens): a prefill longer than the window runs exact windowed attention there, whatever the method, "
        f"so {argument} changes nothing for it. The method runs on the full-attention layers {full}.",
        stacklevel=3,
    )


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
        raise ValueError(
            f"layer indices {unknown} are not attention layers of this model (layers {min(known)}..{max(known)})"
        )
    plans = {}
    for layer in layers:
        name, layer_options = overrides.get(layer, (method, options))
        get_method(name).make_config(**layer_options)  # unknown methods and options fail here, not mid-forward
        plans[layer] = LayerPlan(layer, None if layer in dense else name, dict(layer_options), state)
    return plans


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sparse_attention_mask)


def patch(
    model: torch.nn.Module,
    method: str = "xattention",
    *,
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN,
    dense_layers: Iterable[int] = (),
    layer_methods: Mapping | None = None,
    backend: str = "auto",
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    decode_method: str | None = None,
    decode_options: Mapping | None = None,
    **options,
) -> torch.nn.Module:
    """Make a transformers causal LM run ``method`` on long prefills. Returns the same model.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through ``AttentionInterface``
            (a model, not its name: ``sparse_attn.models.load(name)`` loads one).
        method: a registered method name (``sparse_attn.list_methods()``); ``options`` are its hyperparameters.
        min_seq_len: prefills with at least this many query tokens run the method; shorter ones
            and decode steps run transformers' SDPA.
        dense_layers: layer indices whose prefill stays exact (causal SDPA).
        layer_methods: per-layer overrides ``{layer: name}`` or ``{layer: (name, options)}``.
        backend: the block-sparse backend (``"auto"``, ``"triton"``, ``"flex"``, ``"reference"``).
        block_q, block_k: block sizes of the estimated patterns.
        decode_method: a registered decode method (``sparse_attn.decode.list_decode_methods()``)
            that decode steps run when the cache is a ``sparse_attn.integrations.decode.SparseDecodeCache``;
            ``decode_options`` are its options (``token_budget`` in tokens, ...). ``dense_layers``
            concern prefill only: decode methods keep their own dense layers (an option).

    Sliding-window layers always run exact windowed attention on prefills longer than their
    window; naming one in ``dense_layers`` or ``layer_methods`` warns that it has no effect.
    Patching a patched model replaces its settings. ``unpatch`` restores the previous
    attention implementation.
    """
    check_model(model)
    check_int("min_seq_len", min_seq_len)
    check_int("block_q", block_q)
    check_int("block_k", block_k)
    modules = _attention_modules(model)
    layers = sorted(modules)
    dense_layers = set(dense_layers)
    previous = getattr(model, STATE_ATTRIBUTE, None)
    original = previous.original_implementation if previous else model.config._attn_implementation
    state = PatchState(original, min_seq_len, backend, block_q, block_k)
    if decode_method is not None:
        get_decode_method(decode_method).make_config(**dict(decode_options or {}))  # fails here, not mid-generate
        with_sinks = [type(m).__name__ for m in modules.values() if hasattr(m, "sinks")]
        if with_sinks:
            raise ValueError(
                f"{with_sinks[0]} has attention sinks (learned per-head logits in the softmax), which decode "
                "methods do not support: patch without decode_method (decode steps then run exact attention)"
            )
        state.decode_method, state.decode_options = decode_method, dict(decode_options or {})
        state.num_layers, state.first_layer = len(layers), layers[0]
    elif decode_options:
        raise ValueError("decode_options given without a decode_method")
    plans = _layer_plans(layers, method, options, dense_layers, layer_methods, state)
    sliding = _sliding_window_layers(model.config, layers)
    _warn_about_sliding_layers("dense_layers", dense_layers, sliding, layers)
    _warn_about_sliding_layers("layer_methods", set(layer_methods or {}), sliding, layers)
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation (not AttentionInterface-based)"
        )
    for layer, module in modules.items():
        setattr(module, PLAN_ATTRIBUTE, plans[layer])
    setattr(model, STATE_ATTRIBUTE, state)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the attention implementation the model had before ``patch``. Returns the same model."""
    state = state_of(model)
    model.set_attn_implementation(state.original_implementation)
    for module in model.modules():
        if hasattr(module, PLAN_ATTRIBUTE):
            delattr(module, PLAN_ATTRIBUTE)
    delattr(model, STATE_ATTRIBUTE)
    return model


@contextlib.contextmanager
def record(model: torch.nn.Module, *, capture: bool = False) -> Iterator[Recorder]:
    """``with record(model) as rec:`` collects per-layer, per-head density and estimation time.

    Long prefills (the patched paths) are recorded layer by layer; calls that ran
    transformers' SDPA instead are counted by reason (``rec.sdpa_calls``). When no layer ran
    the method, ``rec.no_method_reason`` says why, ``rec.table()`` ends with it, and leaving
    the block warns with it. Timings synchronize the device. ``capture=True`` also keeps the
    q, k, v of every non-window layer (see :class:`Recorder`); they are copies, so memory
    grows by the layers' activations.
    """
    state = state_of(model)
    recorder = Recorder(capture=capture)
    state.recorders.append(recorder)
    try:
        yield recorder
    finally:
        state.recorders.remove(recorder)
    if recorder.no_method_reason is not None:
        warnings.warn(f"sparse_attn.record: {recorder.no_method_reason}", stacklevel=3)
