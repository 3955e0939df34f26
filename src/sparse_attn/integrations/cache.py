"""Which keyword a transformers model's ``forward`` takes the KV cache under."""

from __future__ import annotations

import inspect

__all__ = ["cache_keyword"]


def cache_keyword(model) -> str:
    """The name under which ``model.forward`` takes the KV cache.

    transformers renamed ``past_key_values`` to ``cache``: newer 5.x versions still accept the
    old name but warn (FutureWarning) on every call, and older 5.x versions know only the old one.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
