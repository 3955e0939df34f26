"""Hugging Face transformers integration (needs ``transformers``), one job per module.

- ``patching``: ``patch`` / ``unpatch`` / ``record`` on a model, per-layer plans, registration.
- ``attention``: the attention function registered in transformers' ``AttentionInterface``.
- ``masks``: the mask function registered in ``AttentionMaskInterface`` (:class:`PrefillMask`).
- ``records``: what ``record`` collects (:class:`Recorder`, :class:`LayerRecord`) and its table.
- ``cache``: :func:`cache_keyword`, the keyword a model's ``forward`` takes the KV cache under.
- ``state``: what ``patch`` attaches to a model (:class:`PatchState`, :class:`LayerPlan`).

The exact dense computations the patched layers run (causal and sliding-window SDPA) live
in :mod:`sparse_attn.backends.dense`.
"""

from .patching import patch, record, unpatch
from .records import LayerRecord, Recorder

__all__ = ["LayerRecord", "Recorder", "patch", "record", "unpatch"]
