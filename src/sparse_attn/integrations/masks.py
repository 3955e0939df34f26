"""The mask function registered in transformers' ``AttentionMaskInterface``.

For a prefill whose mask is plain causal (or sliding-window) with at most left or right
padding, :func:`sparse_attention_mask` returns a :class:`PrefillMask`: the padding, the
window and the arguments to build the dense mask on demand, instead of an ``O(S^2)``
tensor. Every other call (custom mask functions, static caches, decode steps) gets
transformers' own SDPA mask, so it computes exactly what the unpatched model does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

__all__ = ["PrefillMask", "sparse_attention_mask"]

# Query rows sampled to check that a mask function is the plain causal / sliding one.
PROBE_ROWS = 16


@dataclass(eq=False)
class PrefillMask:
    """Stands in for the dense mask of a long prefill with a plain causal (or sliding) layout.

    Attributes:
        key_padding: bool ``(B, Sk)``, True for real tokens, aligned with the key tensor the
            attention function receives; ``None`` when no token is padded.
        window: the sliding window (a key is visible when ``query_pos - window < key_pos <= query_pos``),
            ``None`` for full causal attention.
        sdpa_arguments: the arguments of ``transformers.masking_utils.sdpa_mask`` that build
            the equivalent dense mask, for layers that fall back to SDPA.
    """

    key_padding: torch.Tensor | None
    window: int | None
    sdpa_arguments: dict
    _dense: list = field(default_factory=list, repr=False)

    def dense(self) -> torch.Tensor | None:
        """transformers' SDPA mask for the same call (built once, shared by the layers)."""
        if not self._dense:
            self._dense.append(sdpa_mask(**self.sdpa_arguments))
        return self._dense[0]

    def row_spans(self) -> list[tuple[int, int]] | None:
        """Per batch row, the ``[start, end)`` span of real keys; ``None`` when nothing is padded.

        Raises ``ValueError`` when a row's real tokens are not contiguous.
        """
        if self.key_padding is None:
            return None
        padding = self.key_padding
        positions = torch.arange(padding.shape[1], device=padding.device)
        counts = padding.sum(dim=1)
        starts = torch.where(counts > 0, padding.int().argmax(dim=1), 0)
        ends = starts + counts
        contiguous = (positions >= starts[:, None]) & (positions < ends[:, None])
        if not bool((contiguous == padding).all()):
            raise ValueError(
                "sparse_attn: attention_mask has padding inside a sequence; only left or right padding "
                "(one contiguous span of real tokens per row) is supported. Pad with tokenizer.padding_side='left'."
            )
        return list(zip(starts.tolist(), ends.tolist(), strict=True))


def follows_plain_layout(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, window, device) -> bool:
    """Whether ``mask_function`` is plain causal (with ``window`` when given) on sampled query rows."""
    query_rows = torch.linspace(0, q_length - 1, steps=min(q_length, PROBE_ROWS), device=device).round().long()
    batch = torch.arange(batch_size, device=device)[:, None, None, None]
    head = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
    query = (query_rows + q_offset)[None, None, :, None]
    key = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    expected = key <= query
    if window is not None:
        expected = expected & (key > query - window)
    return bool((mask_function(batch, head, query, key) == expected).all())


def sparse_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    device="cpu",
    **kwargs,
):
    """transformers mask function: a :class:`PrefillMask` for plain prefills, else transformers' SDPA mask."""
    mask_function = mask_function or causal_mask_function
    arguments = dict(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=allow_is_causal_skip,
        use_vmap=use_vmap,
        device=device,
        **kwargs,
    )
    # Custom mask functions (image tokens, packed sequences, blocks) set use_vmap or forbid the
    # causal skip; static caches put queries before the end of the key buffer. Those stay dense.
    plain = (
        q_length > 1
        and allow_is_causal_skip
        and not use_vmap
        and int(q_offset) + q_length == kv_offset + kv_length
        and follows_plain_layout(
            mask_function, batch_size, q_length, kv_length, int(q_offset), kv_offset, local_size, device
        )
    )
    if not plain:
        return sdpa_mask(**arguments)
    key_padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if key_padding is not None:
        key_padding = key_padding[:, kv_offset : kv_offset + kv_length].to(device=device, dtype=torch.bool)
        if bool(key_padding.all()):
            key_padding = None
    return PrefillMask(key_padding=key_padding, window=local_size, sdpa_arguments=arguments)
