"""``sparse-attn show``: the block mask a method picks for one layer of a real model on a real prompt.

The layer's query and key states (after rotary embedding, as the attention function
receives them) are captured during a forward pass through a one-off attention function
registered in transformers' ``AttentionInterface``; the pass stops right after that layer.
The method's estimator then runs on them exactly as a patched model would run it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..api import DEFAULT_BLOCK, estimate
from .grid import MethodVariant
from .plots import block_mask
from .tasks import Sample

_CAPTURE_NAME = "sparse_attn_capture"


class _Captured(Exception):
    """Raised by the capturing attention function to end the forward pass early."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor) -> None:
        super().__init__()
        self.query, self.key = query, key


def full_attention_layers(model) -> list[int]:
    """Indices of the layers with full (not sliding-window) attention, per ``config.layer_types`` when present."""
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [index for index, kind in enumerate(layer_types) if kind == "full_attention"]
    return list(range(config.num_hidden_layers))


def capture_query_key(model, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q (B, Hq, L, D), k (B, Hkv, L, D))`` of ``layer`` for a prefill of ``input_ids`` (B, L)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def capture(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "layer_idx", None) == layer:
            raise _Captured(query.detach().clone(), key.detach().clone())
        return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE_NAME, capture)
    AttentionMaskInterface.register(_CAPTURE_NAME, sdpa_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE_NAME)
    try:
        with torch.inference_mode():
            model(input_ids, use_cache=False, logits_to_keep=1)
    except _Captured as captured:
        return captured.query, captured.key
    finally:
        model.set_attn_implementation(original)
    raise ValueError(f"layer {layer} was not reached: the model has no attention layer with that index")


def show_block_mask(
    model,
    sample: Sample,
    variant: MethodVariant,
    layer: int,
    path: Path,
    *,
    model_name: str,
    block_size: int = DEFAULT_BLOCK,
) -> dict:
    """Estimate ``variant``'s pattern for ``layer`` on ``sample``'s prompt and plot it to ``path``.

    Returns a summary: the layer, the pattern's head count and its density.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([sample.input_ids], device=device)
    query, key = capture_query_key(model, input_ids, layer)
    pattern = estimate(query, key, variant.name, block_q=block_size, block_k=block_size, **dict(variant.options))
    sliding = layer not in full_attention_layers(model)
    note = " (a sliding-window layer: patched models run it as an exact window)" if sliding else ""
    title = (
        f"{variant.label} on {model_name}, layer {layer}{note}\n"
        f"{sample.task}, {sample.length} tokens, needle depth {sample.depth}: density {pattern.density():.2f}"
    )
    block_mask(pattern.to_mask()[0].cpu(), path, title=title, block_size=block_size, needle_spans=sample.needle_spans)
    return {"layer": layer, "heads": pattern.num_heads, "density": pattern.density(), "path": str(path)}
