"""Sparse decode in transformers: a ``Cache`` of paged layers, and the decode step of the attention function.

:class:`SparseDecodeCache` is a transformers ``Cache`` whose layers are
:class:`~sparse_attn.decode.cache.PagedKVCache` (pages with key summaries), so
``model.generate(..., past_key_values=SparseDecodeCache(model))`` runs unchanged. On a model
patched with ``decode_method`` (``sa.patch(model, ..., decode_method="quest",
decode_options={"token_budget": 2048})``), a decode step (one query token per row) of a
layer appends its key and value to the pages and hands the attention function the layer's
paged cache instead of the whole keys and values (:attr:`PatchState.pending_decode`); the
attention function (:func:`decode_step_attention`) runs the decode method's selection and
the paged decode kernel. Prefill keeps the prefill method: prefill calls get the keys and
values as a ``DynamicCache`` would return them.

A sliding-window layer past its window reads exactly its window's tokens through the paged
kernel (token entries; no decode method there: the window is already sparse). Any other
step whose mask is not all-visible (padded batches) falls back to exact SDPA over the whole
cache, gathered from the pages. The layers of one step share one state dict (``num_layers``
set), which the layer-stateful TidalDecode uses.

Double Sparsity: :meth:`SparseDecodeCache.calibrate` runs the model once on a calibration
prompt and keeps each layer's label channels (from the post-RoPE q and k the attention
function sees); layers created afterwards get them.

Not supported: beam search (``reorder_cache``), batch expansion, offloading, static shapes
(``torch.compile`` with CUDA graphs).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from ..checks import check_int
from ..decode.attention import sparse_decode
from ..decode.cache import PagedKVCache
from ..decode.methods.double_sparsity import calibrate_label_channels
from ..decode.selection import DecodeSelection
from ..ops.paged_decode import paged_decode
from .state import STATE_ATTRIBUTE, LayerPlan, PatchState, state_of

__all__ = ["PagedLayer", "SparseDecodeCache", "decode_step_attention"]


class PagedLayer(CacheLayerMixin):
    """One layer of :class:`SparseDecodeCache`: a :class:`PagedKVCache` created on the first update."""

    is_sliding = False
    is_croppable = True

    def __init__(self, owner: SparseDecodeCache, layer: int) -> None:
        super().__init__()
        self.owner, self.layer = owner, layer
        self.paged: PagedKVCache | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, dim = key_states.shape
        self.paged = PagedKVCache(
            batch, kv_heads, dim, page_size=self.owner.page_size, dtype=key_states.dtype, device=key_states.device
        )
        channels = self.owner.label_channels.get(self.layer)
        if channels is not None:
            self.paged.set_label_channels(channels)
        self.device = key_states.device
        self.is_initialized = True

    def _all_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = zip(*(self.paged.sequence(b) for b in range(self.paged.batch)), strict=True)
        return torch.stack(keys), torch.stack(values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        was_empty = self.get_seq_length() == 0
        self.paged.append(key_states, value_states)
        state = self.owner.decode_state()
        if state is not None and key_states.shape[2] == 1:
            # The attention function reads the pages; it gets only the new token here.
            state.pending_decode[self.layer] = self.paged
            return key_states, value_states
        if was_empty:
            return key_states, value_states
        return self._all_keys_values()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.paged is None else self.paged.lengths[0]

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if self.paged is not None and tokens_to_remove:
            self.paged.crop(max(self.get_seq_length() + tokens_to_remove, 0))

    def reset(self) -> None:
        self.paged = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SparseDecodeCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SparseDecodeCache does not support batch expansion (num_return_sequences > 1)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("SparseDecodeCache does not support batch selection")


class SparseDecodeCache(Cache):
    """A transformers ``Cache`` of paged layers (``page_size`` tokens per page) for ``model``.

    With ``model`` patched with a ``decode_method``, decode steps run that method over the
    pages; otherwise the cache behaves as a ``DynamicCache`` (slower: it gathers the pages).
    """

    def __init__(self, model: torch.nn.Module, *, page_size: int = 16) -> None:
        check_int("page_size", page_size)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.page_size = page_size
        self.label_channels: dict[int, torch.Tensor] = {}
        self._model = weakref.ref(model)
        super().__init__(layers=[PagedLayer(self, layer) for layer in range(config.num_hidden_layers)])

    def decode_state(self) -> PatchState | None:
        """The model's patch state when it is patched with a decode method, else ``None``."""
        model = self._model()
        state = getattr(model, STATE_ATTRIBUTE, None) if model is not None else None
        return state if state is not None and state.decode_method is not None else None

    @torch.no_grad()
    def calibrate(self, input_ids: torch.Tensor, *, label_channels: int | None = None) -> None:
        """Double Sparsity's offline calibration: run the model on ``input_ids`` (no cache) and keep,
        per layer, the label channels of its query/key outlier statistic (see
        :func:`~sparse_attn.decode.calibrate_label_channels`). Call before the cache is used."""
        model = self._model()
        state = state_of(model)
        if any(layer.is_initialized for layer in self.layers):
            raise ValueError("calibrate the cache before it holds tokens")
        state.calibration = {"label_channels": label_channels, "channels": {}}
        try:
            model(input_ids, use_cache=False)
            self.label_channels = dict(state.calibration["channels"])
        finally:
            state.calibration = None


def calibration_step(plan: LayerPlan, query: torch.Tensor, key: torch.Tensor) -> None:
    """During :meth:`SparseDecodeCache.calibrate`, keep this layer's label channels."""
    calibration = plan.state.calibration
    calibration["channels"][plan.layer] = calibrate_label_channels(query, key, calibration["label_channels"])


def window_selection(paged: PagedKVCache, window: int | None, attention_mask) -> DecodeSelection | None:
    """Each sequence's last ``window`` tokens as token entries, when the step's mask is exactly
    that sliding window (transformers' rule: a key is visible when ``query - window < key``) and
    nothing is padded; else ``None``."""
    if window is None or not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        return None
    length = paged.lengths[0]
    if attention_mask.shape[-1] != length or min(paged.lengths) != length:
        return None
    positions = torch.arange(length, device=attention_mask.device)
    if not bool((attention_mask == (positions > length - 1 - window)).all()):
        return None
    count = min(window, length)
    tokens = torch.arange(length - count, length, dtype=torch.int32, device=paged.device)
    shape = (paged.batch, paged.kv_heads)
    counts = torch.full(shape, count, dtype=torch.int32, device=paged.device)
    return DecodeSelection(tokens.expand(*shape, count), counts, 1)


def decode_step_attention(
    plan: LayerPlan,
    query: torch.Tensor,
    paged: PagedKVCache,
    attention_mask,
    scaling: float | None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One decode step of one layer over its paged cache. query ``(B, Hq, 1, D)``; returns ``(B, 1, Hq, D)``."""
    state = plan.state
    if plan.layer == state.first_layer or state.decode_step is None:
        state.decode_step = {"num_layers": state.num_layers}
    visible = attention_mask is None or (attention_mask.dtype == torch.bool and bool(attention_mask.all()))
    window = None if visible else window_selection(paged, sliding_window, attention_mask)
    if window is not None:
        out = paged_decode(
            query[:, :, 0], paged.k_pages, paged.v_pages, paged.page_table, paged.seq_lens, window.selected,
            window.counts, scale=scaling, select_block=1,
        )  # fmt: skip
        for recorder in state.recorders:
            recorder.decode_step(plan.layer, f"window={sliding_window}", paged, window)
        return out[:, None]
    if not visible:
        keys, values = zip(*(paged.sequence(b) for b in range(paged.batch)), strict=True)
        out = F.scaled_dot_product_attention(
            query, torch.stack(keys), torch.stack(values), attn_mask=attention_mask, scale=scaling, enable_gqa=True
        )
        for recorder in state.recorders:
            recorder.sdpa_calls["decode step whose mask is not all-visible or a plain window (padding)"] += 1
        return out.transpose(1, 2)
    out, selection = sparse_decode(
        query[:, :, 0], paged, state.decode_method, layer=plan.layer, state=state.decode_step, scale=scaling,
        return_selection=True, **state.decode_options,
    )  # fmt: skip
    for recorder in state.recorders:
        recorder.decode_step(plan.layer, state.decode_method, paged, selection)
    return out[:, None]
