"""What ``sparse_attn.record`` collects: one :class:`LayerRecord` per patched attention call,
a count of the calls that ran transformers' SDPA instead, and the table that shows both.

A recorder also answers the first question a user asks when the table is empty: why did no
layer run the method (:attr:`Recorder.no_method_reason`)?
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from ..pattern import BlockSparsePattern

__all__ = ["WHOLE_BATCH", "DecodeRecord", "LayerRecord", "Recorder", "pattern_head_density", "window_density"]

# ``LayerRecord.row`` of a call that ran the whole unpadded batch at once (shown as "all").
WHOLE_BATCH = -1


@dataclass(frozen=True)
class LayerRecord:
    """One attention layer's long prefill on one batch row.

    ``kind`` is ``"sparse"`` (the method's pattern; the method may be ``dense``), ``"dense"``
    (a layer in ``dense_layers``: exact causal SDPA) or ``"window"`` (a sliding-window layer:
    exact windowed attention). ``row`` is the batch row when a padded batch runs row by row,
    or ``WHOLE_BATCH`` (-1, printed ``all``) when the whole unpadded batch ran at once.
    ``head_density`` holds, per pattern head, the computed blocks over causally valid blocks
    (for ``"window"``: visible token pairs over causal token pairs, the same for every head).
    """

    layer: int
    row: int
    kind: str
    method: str
    seq_q: int
    seq_k: int
    head_density: tuple[float, ...]
    estimate_ms: float
    # Per pattern head, the method a per-head chooser (``auto``) picked; empty for other methods.
    head_methods: tuple[str, ...] = ()

    @property
    def density(self) -> float:
        return sum(self.head_density) / len(self.head_density)


@dataclass(frozen=True)
class DecodeRecord:
    """One layer's decode step (a ``decode_method`` over a paged cache): what it read.

    ``pages`` and ``entries_read`` are means over the batch rows and KV heads; an entry is
    ``select_block`` tokens (a page when it equals the page size). ``tokens_read`` counts a
    partial last page whole.
    """

    layer: int
    method: str
    seq_k: int
    page_size: int
    pages: float
    select_block: int
    entries_read: float

    @property
    def tokens_read(self) -> float:
        return self.entries_read * self.select_block

    @property
    def pages_read(self) -> float:
        """Pages the step read (for token-level selections: tokens over page size, a lower bound)."""
        return self.entries_read if self.select_block == self.page_size else self.tokens_read / self.page_size


@dataclass
class Recorder:
    """Collects a :class:`LayerRecord` for each long-prefill attention call while active.

    ``sdpa_calls`` counts, by reason, the attention calls (one per layer and forward pass)
    that ran transformers' own SDPA instead of the patched path: prefills shorter than
    ``min_seq_len``, decode steps, masks that are not plain causal.

    With ``capture=True`` it also keeps copies of the post-RoPE query, key and value that each
    non-window layer (global / dense / sparse) received, in ``tensors[(layer, row)]`` as
    ``(q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v)``: real inputs for studying estimators.
    """

    records: list[LayerRecord] = field(default_factory=list)
    capture: bool = False
    tensors: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    sdpa_calls: Counter[str] = field(default_factory=Counter)
    decode_records: list[DecodeRecord] = field(default_factory=list)

    def decode_step(self, layer: int, method: str, paged, selection) -> None:
        """Record one layer's decode step over ``paged`` (a PagedKVCache) with ``selection``."""
        pages = sum(paged.num_pages()) / paged.batch
        entries = float(selection.counts.float().mean())
        self.decode_records.append(
            DecodeRecord(layer, method, max(paged.lengths), paged.page_size, pages, selection.select_block, entries)
        )

    @property
    def no_method_reason(self) -> str | None:
        """Why no layer ran the method while recording, or ``None`` when at least one did."""
        if any(r.kind == "sparse" for r in self.records) or self.decode_records:
            return None
        if self.records:
            parts = []
            window_layers = sorted({r.layer for r in self.records if r.kind == "window"})
            dense_layers = sorted({r.layer for r in self.records if r.kind == "dense"})
            if window_layers:
                parts.append(
                    f"layers {window_layers} ran exact sliding-window attention (the prompt is longer than the window)"
                )
            if dense_layers:
                parts.append(f"layers {dense_layers} are in dense_layers (exact causal SDPA)")
            return "no layer ran the method: " + "; ".join(parts)
        if self.sdpa_calls:
            return "no layer ran the method: " + "; ".join(self.sdpa_calls)
        return "no layer ran the method: no attention call ran inside record()"

    def rows(self) -> list[dict]:
        """One dict per record, with the mean density added (JSON-ready)."""
        return [
            {
                "layer": r.layer,
                "row": r.row,
                "kind": r.kind,
                "method": r.method,
                "seq_q": r.seq_q,
                "seq_k": r.seq_k,
                "density": r.density,
                "head_density": list(r.head_density),
                "estimate_ms": r.estimate_ms,
            }
            for r in self.records
        ]

    def table(self) -> str:
        """A printable per-layer table: kind, method, lengths, mean and per-head density, estimate time.

        ``row`` is the batch row, or ``all`` when the whole unpadded batch ran at once. Below it, the calls that ran transformers' SDPA (by reason) and, when no layer ran
        the method, why.
        """
        header = (
            f"{'layer':>5} {'row':>3} {'kind':<6} {'method':<12} {'seq_q':>6} {'seq_k':>6} {'density':>7}  "
            f"{'est ms':>7}  per-head density"
        )
        lines = [header, "-" * len(header)]
        for r in sorted(self.records, key=lambda r: (r.layer, r.row)):
            heads = " ".join(f"{d:.2f}" for d in r.head_density)
            row = "all" if r.row == WHOLE_BATCH else str(r.row)
            lines.append(
                f"{r.layer:>5} {row:>3} {r.kind:<6} {r.method:<12} {r.seq_q:>6} {r.seq_k:>6} "
                f"{r.density:>7.3f}  {r.estimate_ms:>7.2f}  {heads}"
            )
            if r.head_methods:
                lines.append(f"{'':>5} {'':>3} chosen per head: {' '.join(r.head_methods)}")
        steps = self.decode_records
        if steps:
            lines.append(f"decode: {len(steps)} layer step(s); per layer, mean pages read / pages in cache:")
            for layer in sorted({r.layer for r in steps}):
                mine = [r for r in steps if r.layer == layer]
                read = sum(r.pages_read for r in mine) / len(mine)
                held = sum(r.pages for r in mine) / len(mine)
                lines.append(f"{layer:>5} {mine[-1].method:<12} {read:>8.1f} / {held:.1f}")
        for reason, count in self.sdpa_calls.items():
            lines.append(f"{count} layer call(s) ran transformers' SDPA: {reason}")
        if self.no_method_reason is not None:
            lines.append(self.no_method_reason)
        return "\n".join(lines)


def pattern_head_density(pattern: BlockSparsePattern) -> tuple[float, ...]:
    """Per pattern head: computed blocks over causally valid blocks, summed over the batch."""
    valid = int(pattern.causal_block_mask().sum()) * pattern.batch
    kept = pattern.kv_counts.sum(dim=(0, 2), dtype=torch.int64)
    return tuple((kept.double() / valid).tolist())


def window_density(seq_q: int, seq_k: int, window: int) -> float:
    """Visible over causal token pairs for queries at positions ``seq_k - seq_q .. seq_k - 1``."""
    visible_keys = torch.arange(seq_k - seq_q + 1, seq_k + 1, dtype=torch.float64)
    return float(visible_keys.clamp(max=window).sum() / visible_keys.sum())
