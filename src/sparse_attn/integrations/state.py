"""What ``patch`` attaches to a model: one :class:`PatchState` on the model, shared by one
:class:`LayerPlan` on each attention module, under the implementation name ``"sparse_attn"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .records import Recorder

__all__ = ["ATTENTION_NAME", "PLAN_ATTRIBUTE", "STATE_ATTRIBUTE", "LayerPlan", "PatchState", "check_model", "state_of"]

# The name registered in transformers' AttentionInterface and AttentionMaskInterface.
ATTENTION_NAME = "sparse_attn"
PLAN_ATTRIBUTE = "_sparse_attn_plan"
STATE_ATTRIBUTE = "_sparse_attn_state"


@dataclass
class PatchState:
    """What ``patch`` set on a model: shared by all its attention modules.

    ``recorders`` are the active ``record`` contexts; every patched attention call reports to each.
    """

    original_implementation: str
    min_seq_len: int
    backend: str
    block_q: int
    block_k: int
    recorders: list[Recorder] = field(default_factory=list)
    # Decode steps (``decode_method`` set): the decode method and its options, the model's
    # attention layers (count, first index), the paged caches a SparseDecodeCache handed over
    # for the current step by layer, the state dict the current step's layers share, and the
    # Double Sparsity calibration in progress (see integrations.decode).
    decode_method: str | None = None
    decode_options: dict = field(default_factory=dict)
    num_layers: int = 0
    first_layer: int = 0
    pending_decode: dict = field(default_factory=dict)
    decode_step: dict | None = None
    calibration: dict | None = None


@dataclass(frozen=True)
class LayerPlan:
    """How one attention layer runs a long prefill: ``method`` ``None`` means exact dense SDPA."""

    layer: int
    method: str | None
    options: Mapping
    state: PatchState


def check_model(model) -> None:
    """Raise ``TypeError`` unless ``model`` is a module (a name, say, must be loaded first)."""
    if isinstance(model, torch.nn.Module):
        return
    hint = (
        f"; load it first: model, tokenizer = sparse_attn.models.load({model!r})"
        if isinstance(model, (str, os.PathLike))
        else ""
    )
    raise TypeError(f"model must be a transformers model (a torch.nn.Module), got {type(model).__name__}{hint}")


def state_of(model) -> PatchState:
    """The model's :class:`PatchState`; ``ValueError`` when it is not patched."""
    check_model(model)
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise ValueError("model is not patched: call sparse_attn.patch(model, ...) first")
    return state
