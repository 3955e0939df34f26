"""Exact dense attention in the two layouts a patched model runs without a pattern.

``causal_attention`` (full causal) and ``sliding_window_attention`` (causal with a window)
are plain functions over PyTorch's SDPA, not registered backends: they take no
:class:`~sparse_attn.pattern.BlockSparsePattern`. The Hugging Face integration runs them
for ``dense_layers`` and for sliding-window layers.

Layout as everywhere: q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)`` with ``Hq % Hkv == 0``
and ``Sk >= Sq``; the queries are the last ``Sq`` key positions (a chunked prefill attends
to cached keys). Outputs are ``(B, Hq, Sq, Dv)`` (v's head dim) in q's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_attention", "sliding_window_attention"]

# Queries per windowed-SDPA call: large enough to keep launches few on a GPU, small
# enough that the (chunk, chunk + window) score tile stays cheap.
MIN_WINDOW_CHUNK = 1024


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float, chunk: int | None = None
) -> torch.Tensor:
    """Exact causal sliding-window attention: query at position ``p`` sees keys in ``(p - window, p]``.

    Runs SDPA over chunks of ``chunk`` queries (default ``max(window, MIN_WINDOW_CHUNK)``)
    against only their window's key span, so compute and memory are ``O(Sq * (chunk + window))``
    instead of ``O(Sq * Sk)``. Returns ``(B, Hq, Sq, D)`` in q's dtype.
    """
    seq_q, seq_k = q.shape[2], k.shape[2]
    offset = seq_k - seq_q
    group = q.shape[1] // k.shape[1]
    chunk = chunk or max(window, MIN_WINDOW_CHUNK)
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for start in range(0, seq_q, chunk):
        stop = min(start + chunk, seq_q)
        first_key, end_key = max(offset + start - window + 1, 0), offset + stop
        query_position = torch.arange(offset + start, offset + stop, device=q.device)[:, None]
        key_position = torch.arange(first_key, end_key, device=q.device)[None, :]
        visible = (key_position <= query_position) & (key_position > query_position - window)
        # Expanding K/V over the GQA group only for this small span keeps SDPA on a fused kernel.
        keys = k[:, :, first_key:end_key].repeat_interleave(group, dim=1)
        values = v[:, :, first_key:end_key].repeat_interleave(group, dim=1)
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            q[:, :, start:stop], keys, values, attn_mask=visible, scale=scale
        )
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Exact causal SDPA with queries at the last ``Sq`` key positions; ``(B, Hq, Sq, D)``."""
    seq_q, seq_k = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if seq_q == seq_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # SDPA's is_causal aligns to the top-left corner; chunked prefill needs bottom-right.
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(diagonal=seq_k - seq_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=gqa)
