"""Integrations: Hugging Face transformers (needs ``transformers``) and diffusers (needs ``diffusers``).

transformers, one job per module:

- ``patching``: ``patch`` / ``unpatch`` / ``record`` on a model, per-layer plans, registration.
- ``attention``: the attention function registered in transformers' ``AttentionInterface``.
- ``masks``: the mask function registered in ``AttentionMaskInterface`` (:class:`PrefillMask`).
- ``records``: what ``record`` collects (:class:`Recorder`, :class:`LayerRecord`) and its table.
- ``cache``: :func:`cache_keyword`, the keyword a model's ``forward`` takes the KV cache under.
- ``state``: what ``patch`` attaches to a model (:class:`PatchState`, :class:`LayerPlan`).

diffusers: ``diffusers`` (``patch_diffusers`` / ``unpatch_diffusers``: a processor wrapper that
runs a method inside image and video transformers).

The exact dense computations the patched layers run (causal and sliding-window SDPA) live
in :mod:`sparse_attn.backends.dense`. The names below load on first access, so importing one
integration does not import the other's library.
"""

from __future__ import annotations

import importlib

# Public names -> the submodule defining them.
_LAZY_ATTRIBUTES = {
    "LayerRecord": "records",
    "Recorder": "records",
    "patch": "patching",
    "record": "patching",
    "unpatch": "patching",
}

__all__ = ["LayerRecord", "Recorder", "patch", "record", "unpatch"]


def __getattr__(name: str):
    if name not in _LAZY_ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY_ATTRIBUTES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES))
