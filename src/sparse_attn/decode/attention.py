"""One decode step of one layer: a decode method's selection, then the paged decode kernel over it."""

from __future__ import annotations

import torch

from ..checks import check_int
from ..ops.paged_decode import paged_decode
from .cache import PagedKVCache
from .registry import get_decode_method
from .selection import DecodeSelection

__all__ = ["sparse_decode"]


def sparse_decode(
    q: torch.Tensor,
    cache: PagedKVCache,
    method: str = "quest",
    *,
    layer: int = 0,
    state: dict | None = None,
    scale: float | None = None,
    return_selection: bool = False,
    **options,
):
    """Attention of one new query token per sequence over the pages ``method`` selects.

    q ``(B, Hq, D)`` in the cache's dtype, with the step's own key and value already appended
    to ``cache`` (this layer's :class:`PagedKVCache`). ``layer`` is the layer's index (methods
    keep early layers dense) and ``state`` a dict shared by the layers of one step (fresh per
    step; layer-stateful methods such as ``tidaldecode`` need it). ``options`` are the method's
    (``token_budget`` in tokens, ...; ``sparse_attn.decode.get_decode_method(method).defaults()``).
    Returns ``out`` ``(B, Hq, D)``, and the :class:`DecodeSelection` with ``return_selection``.

    Example::

        cache = PagedKVCache(batch, kv_heads, head_dim, page_size=16, dtype=k.dtype, device=k.device)
        cache.append(k, v)                      # prefill keys/values (B, Hkv, S, D)
        cache.append(k_new, v_new)              # the step's own key/value (B, Hkv, 1, D)
        out = sparse_decode(q_new, cache, "quest", layer=3, token_budget=2048)
    """
    spec = get_decode_method(method)
    config = spec.make_config(**options)
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    check_int("layer", layer, minimum=0)
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict shared by the layers of one step, or None, got {type(state).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    heads_fit = q.dim() == 3 and q.shape[1] > 0 and q.shape[1] % cache.kv_heads == 0
    if not heads_fit or q.shape[0] != cache.batch or q.shape[2] != cache.head_dim:
        raise ValueError(
            f"q must be (batch, q_heads, head_dim) = ({cache.batch}, a positive multiple of the cache's "
            f"{cache.kv_heads} KV heads, {cache.head_dim}) to fit the cache, got {tuple(q.shape)}"
        )
    if min(cache.lengths) == 0:
        raise ValueError(f"every sequence needs at least its own token in the cache, got lengths {cache.lengths}")
    state = {} if state is None else state
    selection: DecodeSelection = spec.select(q, cache, config, layer=layer, state=state)
    out = paged_decode(
        q, cache.k_pages, cache.v_pages, cache.page_table, cache.seq_lens, selection.selected, selection.counts,
        scale=scale, select_block=selection.select_block,
    )  # fmt: skip
    return (out, selection) if return_selection else out
