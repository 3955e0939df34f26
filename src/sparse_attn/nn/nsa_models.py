"""Swap a Hugging Face causal LM's attention for :class:`~sparse_attn.nn.nsa.NativeSparseAttention`, to train it.

:func:`swap_in_nsa` gives every self-attention module of a transformers model (Llama, Qwen 2/3,
SmolLM2, Mistral, Gemma 3: anything whose attention goes through ``AttentionInterface``) its own
``NativeSparseAttention`` as the submodule ``nsa`` and switches the model to the attention
function registered here, which runs it on the module's projected, position-encoded queries,
keys and values. The model's own q/k/v/o projections are kept (NSA starts from them); the NSA
parameters (compression MLPs, gates) are new and train with the rest. By default
(``start="dense"``) they start where the module is closest to the model's dense attention: the
compressors as mean pooling plus a zero-initialised MLP residual (``compressor="mean_mlp"``) and
the gates biased to (compressed, selected, window) = (-4, 4, -4), so the output is at first
nearly the selected branch alone, whose blocks the mean-pooled keys choose. Without training
(SmolLM2-135M on the CPU, one held-out 4,096-token sequence, ``benchmarks/nsa_start.py``): validation
loss 2.554 against dense 2.539, where ``start="paper"`` (the paper's MLP compressor, every gate
at 1/2) gives 2.835. Continued training at 8K on the H200 (``benchmarks/train_smollm2.py``, one
run cut at step 274 of 300) stayed within 1.5-2.2 % of dense's validation loss (1.75 % at the
end), where the paper start sat 6-7 % above (``docs/h200.md``, "NSA's dense start"). ``generate()`` works with
the model's KV cache: a decode step is NSA with one query at the end of the cached keys (the
module's decode path), the same rule a full recompute applies to that token. The compressed
tokens of each layer are kept beside the keys: a :class:`~sparse_attn.nn.nsa.CompressedTokenCache`
per layer stored on the transformers ``Cache`` object itself (found among the attention module's
call arguments by a forward pre-hook), so they live and die with it; the cache's ``crop``,
``reset``, ``reorder_cache``, ``batch_select_indices`` and ``batch_repeat_interleave`` are wrapped on
that object to clear them (assisted decoding crops, beam search reorders). Without a cache
(``use_cache=False``) every call compresses from scratch.

Limits: batches without padding (a padded batch raises ``ValueError``); every attention layer
becomes NSA, sliding-window layers included (NSA has its own window branch); models with logit
soft-capping are refused. Importing this module imports transformers (``import sparse_attn``
does not).
"""

from __future__ import annotations

import types

import torch
from transformers import AttentionInterface, Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..integrations.attention import autocast_inputs
from ..integrations.patching import _attention_modules
from ..integrations.state import check_model
from .nsa import CompressedTokenCache, NativeSparseAttention

__all__ = ["ATTENTION_NAME", "DENSE_START", "nsa_attention_forward", "swap_in_nsa"]

ATTENTION_NAME = "sparse_attn_nsa"
NSA_ATTRIBUTE = "nsa"
KV_CACHE_ATTRIBUTE = "_sparse_attn_kv_cache"  # the transformers Cache of the call in progress
STATE_ATTRIBUTE = "_sparse_attn_nsa_compressed"  # on a Cache: {layer key: CompressedTokenCache}
HOOKED_ATTRIBUTE = "_sparse_attn_nsa_hooked"
MUTATORS = ("crop", "reset", "reorder_cache", "batch_select_indices", "batch_repeat_interleave")
# swap_in_nsa's start="dense": the options that make a fresh module close to dense attention.
DENSE_START = {"compressor": "mean_mlp", "gate_bias": (-4.0, 4.0, -4.0)}
STARTS = {"dense": DENSE_START, "paper": {}}


def _remember_cache(module, args, kwargs):
    """Forward pre-hook: keep the call's transformers ``Cache`` (whatever its argument's name) on the module."""
    found = next((value for value in (*args, *kwargs.values()) if isinstance(value, Cache)), None)
    module.__dict__[KV_CACHE_ATTRIBUTE] = found


def _forget_cache(module, args, kwargs, output):
    module.__dict__[KV_CACHE_ATTRIBUTE] = None


def _clearing(name: str):
    """A method that clears the compressed-token caches of ``self`` and then runs the class's ``name``.
    Bound to the instance with ``types.MethodType``: ``copy.deepcopy`` rebinds it to the copy."""

    def method(self, *args, **kwargs):
        for state in self.__dict__.get(STATE_ATTRIBUTE, {}).values():
            state.reset()
        return getattr(type(self), name)(self, *args, **kwargs)

    return method


def _compressed_cache(module) -> CompressedTokenCache | None:
    """The compressed-token cache of ``module``'s layer inside the call's transformers cache, or ``None``."""
    kv_cache = module.__dict__.get(KV_CACHE_ATTRIBUTE)
    if kv_cache is None:
        return None
    states = kv_cache.__dict__.get(STATE_ATTRIBUTE)
    if states is None:
        states = kv_cache.__dict__[STATE_ATTRIBUTE] = {}
        for name in MUTATORS:
            if callable(getattr(type(kv_cache), name, None)):
                setattr(kv_cache, name, types.MethodType(_clearing(name), kv_cache))
    key = getattr(module, "layer_idx", None)
    return states.setdefault(id(module) if key is None else key, CompressedTokenCache())


def nsa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: ``query`` ``(B, Hq, Sq, D)``, ``key`` / ``value``
    ``(B, Hkv, Sk, D)`` (cache included) -> ``((B, Sq, Hq, D), None)``."""
    nsa = getattr(module, NSA_ATTRIBUTE, None)
    if nsa is None:
        raise ValueError(
            f"{type(module).__name__} has no NSA module: call sparse_attn.nn.nsa_models.swap_in_nsa(model)"
        )
    # The mask is transformers' SDPA mask (None when plain causal); the last query sees every
    # real key, so a key it cannot see is padding.
    if isinstance(attention_mask, torch.Tensor) and not bool(attention_mask[..., -1, :].all()):
        raise ValueError("NativeSparseAttention in a transformers model takes batches without padding")
    cache = _compressed_cache(module) if not torch.is_grad_enabled() else None
    out = nsa(*autocast_inputs(query, key, value), scale=scaling, cache=cache)
    return out.transpose(1, 2).contiguous(), None


def swap_in_nsa(model: torch.nn.Module, *, start: str = "dense", **options) -> torch.nn.Module:
    """Give every attention layer of ``model`` an NSA module (``options`` as in
    :class:`~sparse_attn.nn.nsa.NativeSparseAttention`: block sizes, ``select_top_n``, ``window``,
    ``compressor``, ``gate_bias``, ``backend``) on the layer's device and dtype, and switch the
    model to it. Returns the same model.

    ``start``: ``"dense"`` (default) fills ``compressor`` and ``gate_bias`` not given in
    ``options`` with :data:`DENSE_START` (the module starts close to the model's dense attention,
    see the module docstring); ``"paper"`` leaves the module's own defaults (the paper's MLP
    compressor, gates at 1/2)."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {tuple(STARTS)}, got {start!r}")
    options = {**STARTS[start], **options}
    check_model(model)
    config = model.config
    modules = _attention_modules(model)
    AttentionInterface.register(ATTENTION_NAME, nsa_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    for module in modules.values():
        head_dim = getattr(module, "head_dim", config.hidden_size // config.num_attention_heads)
        nsa = NativeSparseAttention(head_dim, config.num_attention_heads, config.num_key_value_heads, **options)
        reference = next(module.parameters())
        module.add_module(NSA_ATTRIBUTE, nsa.to(device=reference.device, dtype=reference.dtype))
        if not module.__dict__.get(HOOKED_ATTRIBUTE):
            module.register_forward_pre_hook(_remember_cache, with_kwargs=True)
            module.register_forward_hook(_forget_cache, with_kwargs=True)
            module.__dict__[HOOKED_ATTRIBUTE] = True
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
    return model
