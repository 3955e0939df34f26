"""Swap a Hugging Face causal LM's attention for :class:`~sparse_attn.nn.nsa.NativeSparseAttention`, to train it.

:func:`swap_in_nsa` gives every self-attention module of a transformers model (Llama, Qwen 2/3,
SmolLM2, Mistral, Gemma 3: anything whose attention goes through ``AttentionInterface``) its own
``NativeSparseAttention`` as the submodule ``nsa`` and switches the model to the attention
function registered here, which runs it on the module's projected, position-encoded queries,
keys and values. The model's own q/k/v/o projections are kept (NSA starts from them); the NSA
parameters (compression MLPs, gates) are new and train with the rest. ``generate()`` works with
the model's KV cache: a decode step is NSA with one query at the end of the cached keys (the
module takes ``Sq < Sk``), the same rule a full recompute applies to that token.

Limits: batches without padding (a padded batch raises ``ValueError``); every attention layer
becomes NSA, sliding-window layers included (NSA has its own window branch); models with logit
soft-capping are refused. Importing this module imports transformers (``import sparse_attn``
does not).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..integrations.attention import autocast_inputs
from ..integrations.patching import _attention_modules
from ..integrations.state import check_model
from .nsa import NativeSparseAttention

__all__ = ["ATTENTION_NAME", "nsa_attention_forward", "swap_in_nsa"]

ATTENTION_NAME = "sparse_attn_nsa"
NSA_ATTRIBUTE = "nsa"


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
    out = nsa(*autocast_inputs(query, key, value), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def swap_in_nsa(model: torch.nn.Module, **options) -> torch.nn.Module:
    """Give every attention layer of ``model`` an NSA module (``options`` as in
    :class:`~sparse_attn.nn.nsa.NativeSparseAttention`: block sizes, ``select_top_n``, ``window``,
    ``backend``) on the layer's device and dtype, and switch the model to it. Returns the same model."""
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
    model.set_attn_implementation(ATTENTION_NAME)
    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation")
    return model
