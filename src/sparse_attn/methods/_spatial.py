"""What the spatial methods share: their layout options, per-dimension option parsing, and the call checks.

Every spatial method takes the layout as options: ``grid=(T, H, W)`` or ``(H, W)`` (or
``(L,)``), ``text_tokens=`` and ``text_position=`` (see :class:`sparse_attn.layouts.Layout`),
and is bidirectional: a causal call, a missing grid, or q/k lengths other than the layout's
raise ``ValueError`` naming the option.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from ..layouts import Layout, _as_sizes

__all__ = ["per_dim", "spatial_layout", "static_pattern"]


def per_dim(name: str, value, rank: int) -> tuple[int, ...]:
    """``value`` (an int, or one int >= 1 per grid dimension) as a tuple of ``rank`` ints."""
    return _as_sizes(name, value, rank)


def check_grid_option(config) -> tuple[int, ...] | None:
    """Validate a spatial config's ``grid`` option (``None`` allowed: it is required at estimate time).

    Also turns list-valued options into tuples (and an int ``grid`` into ``(L,)``), so configs stay
    hashable (:func:`static_pattern` caches on them) whether sizes come as lists or tuples."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, list):
            object.__setattr__(config, field.name, tuple(value))
    if config.grid is None:
        return None
    grid = Layout(config.grid).grid  # checked; an int is a 1D grid
    object.__setattr__(config, "grid", grid)
    return grid


def spatial_layout(method: str, q: torch.Tensor, k: torch.Tensor, config, *, causal: bool, tile) -> Layout:
    """The layout of a spatial method's call (``config``'s ``grid``, ``text_tokens`` and
    ``text_position``, with ``tile``), after checking that the call fits it."""
    grid = config.grid
    if causal:
        raise ValueError(f"method {method!r} is bidirectional (video/image attention): call it with causal=False")
    if grid is None:
        raise ValueError(f"method {method!r} needs the token grid: pass grid=(T, H, W), (H, W) or (L,)")
    layout = Layout(grid, tile=tile, text_tokens=config.text_tokens, text_position=config.text_position)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"method {method!r} is self-attention over one layout: q and k must have the same length, "
            f"got {q.shape[2]} and {k.shape[2]}"
        )
    layout.check_sequence("q", q.shape[2])
    return layout


@functools.lru_cache(maxsize=32)
def static_pattern(build: Callable, config, layout: Layout, block_q: int, block_k: int, device: torch.device):
    """``build(config, layout, block_q=, block_k=, device=)``, built once per distinct arguments (LRU of 32)."""
    return build(config, layout, block_q=block_q, block_k=block_k, device=device)
