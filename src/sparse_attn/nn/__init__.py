"""Trainable modules built on the block-sparse engine.

* :mod:`.seer`: SeerAttention's AttnGate (learned block gates), their self-distillation and
  the gate files the ``seer`` method loads.
* :mod:`.nsa`: NSA's NativeSparseAttention (compressed, selected and sliding-window branches)
  and the CompressedTokenCache its decode steps keep.
* :class:`SparseLinearAttention`: SLA with its learnable projection (defined beside the method,
  :mod:`sparse_attn.methods.sla`).
"""

from ..methods.sla import SparseLinearAttention
from .nsa import CompressedTokenCache, NativeSparseAttention
from .seer import AttnGate, SeerGates

__all__ = ["AttnGate", "CompressedTokenCache", "NativeSparseAttention", "SeerGates", "SparseLinearAttention"]
