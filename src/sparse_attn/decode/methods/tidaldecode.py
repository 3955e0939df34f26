"""TidalDecode: a few token-selection layers run full attention; the layers after them reuse their top tokens.

Paper: Lijie Yang, Zhihao Zhang, Zhuofu Chen, Zikun Li, Zhihao Jia, "TidalDecode: Fast and
Accurate LLM Decoding with Position Persistent Sparse Attention", ICLR 2025, arXiv:2410.05076.

Rule (position persistent sparse attention): in one decode step the first ``dense_layers``
layers run full attention; the token-selection layer (``selection_layer``) also runs full
attention and keeps the ``token_budget`` tokens with the highest attention scores; every
following layer attends only to those tokens, until the re-selection layer (a middle layer),
which again runs full attention and picks the tokens the remaining layers use. Selected
tokens are positions, the same in every layer's cache. Selection is token-level
(``select_block = 1``).

How it plugs into a model: the method is layer-stateful. The caller passes the layers of one
decode step, in order, the same ``state`` dict (fresh each step); the selection layers write
their choice to ``state["tidaldecode"]`` and the later layers read it. ``state["num_layers"]``
(the model's layer count) fixes the default re-selection layer. The transformers integration
does this; a caller driving :func:`sparse_attn.decode.sparse_decode` layer by layer does the same.

Defaults: ``token_budget=2048``, ``dense_layers=2`` and ``selection_layer=2`` (the paper's
Figure 2: full attention in the first two layers, token selection in the third),
``reselection_layer=13``: the paper re-selects at "a middle layer"; 13 is the default of the
authors' released code (for Llama-3-8B's 32 layers), seen in a search excerpt, not in the
paper's text. ``reselection_layer=None`` takes the model's middle layer ``num_layers // 2``
from ``state["num_layers"]``; pass the index that suits the model's depth.

Choices where the paper is silent or unverified here:

- GQA: one token set per KV head, ranked by the group's summed attention probabilities (NSA's
  group-consistent rule, arXiv:2502.11089), so the kernel reads each token once per group. The
  released code's selector appears (search excerpt) to take a top-k per attention head; with
  one query head per KV head the two agree.
- The newest token (the step's own key) is always kept.
- The paper's KV-cache correction (periodically re-filling the cache of sparsely decoded
  tokens with full attention) is not implemented.
- A layer past ``selection_layer`` that finds no selection in the step's state (the selection
  layer did not run the method: in Gemma 3 it is a sliding-window layer, which reads its window)
  selects itself, so the first layer that runs the method is the selection layer. A
  re-selection layer that does not run the method is skipped.
- The selection layer's scores are computed from the full keys gathered in PyTorch, beside its
  full-attention output from the kernel (the paper fuses them; a fused kernel is not done).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checks import check_int
from ..registry import register_decode_method
from ..selection import DecodeSelection, dense_selection, group_probabilities, topk_selection

STATE_KEY = "tidaldecode"


@dataclass(frozen=True)
class TidalDecodeConfig:
    token_budget: int = 2048
    dense_layers: int = 2
    selection_layer: int = 2
    reselection_layer: int | None = 13

    def __post_init__(self):
        check_int("token_budget", self.token_budget)
        check_int("dense_layers", self.dense_layers, minimum=0)
        check_int("selection_layer", self.selection_layer, minimum=0)
        check_int("reselection_layer", self.reselection_layer, minimum=0, allow_none=True)
        if self.reselection_layer is not None and self.reselection_layer <= self.selection_layer:
            raise ValueError(
                f"reselection_layer ({self.reselection_layer}) must come after selection_layer ({self.selection_layer})"
            )


def attention_token_scores(q: torch.Tensor, cache) -> torch.Tensor:
    """Exact scaled scores ``q · k / sqrt(D)`` of every token slot, float32 ``(B, Hq, max_pages * P)``."""
    batch, q_heads, dim = q.shape
    group = q_heads // cache.kv_heads
    # (B, max_pages, Hkv, P, D) -> (B, Hkv, D, max_pages * P)
    keys = cache.k_pages[cache.page_table.long()].permute(0, 2, 4, 1, 3).flatten(3).float()
    grouped = q.float().view(batch, cache.kv_heads, group, dim)
    return (grouped @ keys).reshape(batch, q_heads, -1) * dim**-0.5


def reselection_layer(config: TidalDecodeConfig, state: dict) -> int:
    if config.reselection_layer is not None:
        return config.reselection_layer
    if "num_layers" not in state:
        raise ValueError("tidaldecode needs state['num_layers'] (or an explicit reselection_layer)")
    return max(state["num_layers"] // 2, config.selection_layer + 1)


@register_decode_method(
    "tidaldecode",
    config=TidalDecodeConfig,
    paper="TidalDecode (arXiv:2410.05076)",
    summary="full attention in a selection layer and a middle re-selection layer; other layers reuse their top tokens",
)
def select_tidaldecode(q, cache, config: TidalDecodeConfig, *, layer: int, state: dict) -> DecodeSelection:
    if layer < max(config.dense_layers, config.selection_layer):
        return dense_selection(cache)
    # A layer past the selection layer that finds no selection in the step's state selects
    # itself: the selection layer did not run the method (a sliding-window layer of Gemma 3
    # reads its window instead), so the first layer that does takes its role.
    selects = layer in (config.selection_layer, reselection_layer(config, state)) or STATE_KEY not in state
    if selects:
        scores = attention_token_scores(q, cache)
        lengths = cache.seq_lens.long()
        valid = torch.arange(scores.shape[-1], device=q.device) < lengths[:, None, None]
        probabilities = group_probabilities(scores, valid, cache.kv_heads)
        state[STATE_KEY] = topk_selection(probabilities, lengths, config.token_budget, 1)
        return dense_selection(cache)
    return state[STATE_KEY]
