"""Double Sparsity: token selection from a few offline-calibrated label channels of the keys.

Paper: Shuo Yang, Ying Sheng, Joseph E. Gonzalez, Ion Stoica, Lianmin Zheng, "Post-Training
Sparse Attention with Double Sparsity", 2024, arXiv:2408.07092.

Rule: channel sparsity is nearly static per head, so it is found once, offline: on a
calibration prompt, the channels ``c`` with the largest outlier statistic ``mean_t |q_{t,c}
k_{t,c}|`` (the paper's query-key outlier criterion) become the head's ``r`` label channels
(:func:`calibrate_label_channels`). The cache keeps each token's key at those channels (the
label cache, :meth:`~sparse_attn.decode.cache.PagedKVCache.set_label_channels`). At each step
``q`` at the label channels times the label cache approximates ``q · k`` for every token, and
the step reads the ``token_budget`` tokens with the highest approximate scores: selection is
token-level (``select_block = 1``), as in the paper.

Defaults: ``token_budget=2048``; ``label_channels=None`` means ``max(1, head_dim // 16)`` (the
paper's 1/16 channel sparsity; 8 of 128 channels); ``dense_layers=0``.

Choices where the paper is silent or unverified here:

- GQA (the paper's Llama-2 models are multi-head): one label set and one selection per KV
  head. The statistic averages ``|q_{t,c} k_{t,c}|`` over the query heads of the group too;
  tokens are ranked by the group's summed approximate scores, ``(sum_h q_h)[labels] ·
  k[labels]`` (one product per KV head; the group rule of ``quest`` and of ``moba``'s
  ``share_in_group``).
- The calibration statistic is averaged over all calibration positions (the paper's exact
  averaging, and whether it uses the q of the same position, could not be checked against its
  text in this session).
- The newest token (the step's own key) is always read.
- The label cache is kept in the keys' dtype (the paper stores it in 4 bits; not done).
- ``dense_layers=0``: whether the paper keeps the first layers dense was not verified; pass
  ``dense_layers=2`` to match Quest's setting.
- Without calibrated channels in the cache, selection raises (no silent fallback).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checks import check_int
from ..registry import register_decode_method
from ..selection import DecodeSelection, dense_selection, topk_selection

__all__ = ["DoubleSparsityConfig", "calibrate_label_channels", "label_scores"]


@dataclass(frozen=True)
class DoubleSparsityConfig:
    token_budget: int = 2048
    label_channels: int | None = None
    dense_layers: int = 0

    def __post_init__(self):
        check_int("token_budget", self.token_budget)
        check_int("label_channels", self.label_channels, allow_none=True)
        check_int("dense_layers", self.dense_layers, minimum=0)


def calibrate_label_channels(q: torch.Tensor, k: torch.Tensor, label_channels: int | None = None) -> torch.Tensor:
    """Per KV head, the ``label_channels`` (default ``max(1, D // 16)``) channels with the largest
    ``mean |q_c k_c|`` over the calibration positions and the group's query heads.

    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)`` (post-RoPE, as attention sees them). Returns int64
    ``(Hkv, r)``, sorted.
    """
    batch, q_heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape[0] != batch or k.shape[2:] != (seq, dim) or q_heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, Hq, S, D) and (B, Hkv, S, D)")
    count = max(1, dim // 16) if label_channels is None else label_channels
    check_int("label_channels", count)
    if count > dim:
        raise ValueError(f"label_channels ({count}) must be <= head_dim ({dim})")
    grouped = q.float().view(batch, kv_heads, q_heads // kv_heads, seq, dim)
    statistic = (grouped * k.float()[:, :, None]).abs().mean(dim=(0, 2, 3))  # (Hkv, D)
    return statistic.topk(count, dim=-1).indices.sort(dim=-1).values


def label_scores(q: torch.Tensor, cache) -> torch.Tensor:
    """The group's summed approximate ``q · k`` of every token slot from the label cache, float32
    ``(B, Hkv, max_pages * P)``; slots past a sequence's end are ``-inf``."""
    batch, q_heads, dim = q.shape
    group_q = q.float().view(batch, cache.kv_heads, q_heads // cache.kv_heads, dim).sum(2)  # (B, Hkv, D)
    q_labels = torch.gather(group_q, 2, cache.label_channels[None].expand(batch, -1, -1))  # (B, Hkv, r)
    # (B, max_pages, Hkv, P, r) -> (B, Hkv, max_pages * P, r)
    labels = cache.labels[cache.page_table.long()].permute(0, 2, 1, 3, 4).flatten(2, 3)
    scores = (labels.float() @ q_labels[..., None])[..., 0]
    slots = torch.arange(scores.shape[-1], device=q.device)
    return scores.masked_fill(slots >= cache.seq_lens.long()[:, None, None], float("-inf"))


@register_decode_method(
    "double_sparsity",
    config=DoubleSparsityConfig,
    paper="Double Sparsity (arXiv:2408.07092)",
    summary="top tokens by q·k estimated on offline-calibrated label channels (label cache); token-level",
)
def select_double_sparsity(q, cache, config: DoubleSparsityConfig, *, layer: int, state: dict) -> DecodeSelection:
    if layer < config.dense_layers:
        return dense_selection(cache)
    if cache.label_channels is None:
        raise ValueError(
            "double_sparsity needs calibrated label channels in the cache: "
            "cache.set_label_channels(calibrate_label_channels(q, k)) on a calibration prompt"
        )
    if config.label_channels is not None and cache.label_channels.shape[1] != config.label_channels:
        raise ValueError(
            f"label_channels ({config.label_channels}) differs from the {cache.label_channels.shape[1]} "
            "channels the cache was calibrated with"
        )
    return topk_selection(label_scores(q, cache), cache.seq_lens, config.token_budget, 1)
