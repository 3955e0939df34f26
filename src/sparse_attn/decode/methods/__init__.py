"""The decode methods; importing this package registers them (one module per method)."""

from __future__ import annotations

from . import dense, double_sparsity, moba, quest, retrieval, streaming, tidaldecode  # noqa: F401  (registration)
