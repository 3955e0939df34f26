"""Inputs with planted attention structure, and the blocks that structure makes important.

Each structure lives in its own coordinates of the head dimension, on top of small noise:

* sinks: the first ``sink_tokens`` keys carry a large component every query shares;
* vertical: a few keys from ``vertical_position`` on carry another shared component;
* local band: a RoPE-style rotation of a shared vector (several frequencies) makes
  ``q_p · k_t`` peak at ``t = p`` and fall off with distance;
* slash: the same with the keys rotated ``slash_distance`` positions ahead, so
  ``q_p · k_t`` peaks at ``p - t = slash_distance``;
* needles: per query head, one query block and one far KV block share a component
  (distinct per head of a GQA group, so heads differ, unless ``needle_shared_by_group``).

:func:`planted_blocks` lists the blocks these structures make dominant. Generic: usable by
any estimator test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_attn.geometry import causal_block_mask, diagonal_block_mask, num_blocks


@dataclass(frozen=True)
class PlantedSpec:
    batch: int = 1
    q_heads: int = 4
    kv_heads: int = 1
    seq_q: int = 512
    seq_k: int = 512
    dim: int = 128
    block: int = 16
    sink_tokens: int = 4
    vertical_position: int | None = 200
    vertical_width: int = 4  # keys in the column, from vertical_position on
    slash_distance: int | None = 96
    needles: bool = True
    needle_shared_by_group: bool = False  # the heads of a GQA group share one needle
    # Attention logits (after the 1/sqrt(D) scale) of each structure, against ~0 for the rest.
    sink_logit: float = 7.0
    vertical_logit: float = 8.0
    band_logit: float = 9.0  # at the peak of the local band and of the slash
    needle_logit: float = 5.0
    noise: float = 0.3
    seed: int = 0

    @property
    def offset(self) -> int:
        return self.seq_k - self.seq_q


_SINK, _VERTICAL, _NEEDLE0 = 0, 1, 2  # needle coordinates: 2 .. 2 + group - 1
_BAND, _SLASH, _FREQUENCIES = 16, 72, 28  # rotation coordinates: 28 pairs each


def needle_blocks(spec: PlantedSpec) -> list[tuple[int, int]]:
    """Per query head, its (query block, KV block) needle: far apart, different per head."""
    n_q, n_kv = num_blocks(spec.seq_q, spec.block), num_blocks(spec.seq_k, spec.block)
    first_query_kv_block = spec.offset // spec.block
    group = spec.q_heads // spec.kv_heads
    needles = []
    for query_head in range(spec.q_heads):
        head = query_head // group if spec.needle_shared_by_group else query_head
        q_block = n_q - 1 - (head % max(1, n_q // 2))
        kv_block = 1 + (3 * head) % max(1, first_query_kv_block + q_block - 3)
        needles.append((q_block, min(kv_block, n_kv - 1)))
    return needles


def _rotation(positions: torch.Tensor) -> torch.Tensor:
    """cos/sin features ``(S, 2 * _FREQUENCIES)`` whose dot products depend on position differences.

    Periods from 3 to 64 positions, log-spaced: the summed cosines peak at distance 0, fall
    to a third within a few positions and stay below ~0.37 of the peak further out.
    """
    periods = torch.logspace(
        torch.log10(torch.tensor(3.0)).item(), torch.log10(torch.tensor(64.0)).item(), _FREQUENCIES
    )
    angles = positions[:, None].double() * (2 * torch.pi / periods)[None, :]
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).reshape(len(positions), -1).float()


def planted_qkv(spec: PlantedSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)`` with the planted structure."""
    if spec.dim < _SLASH + 2 * _FREQUENCIES:
        raise ValueError(f"planted inputs need dim >= {_SLASH + 2 * _FREQUENCIES}")
    generator = torch.Generator().manual_seed(spec.seed)
    group = spec.q_heads // spec.kv_heads
    q = spec.noise * torch.randn(spec.batch, spec.q_heads, spec.seq_q, spec.dim, generator=generator)
    k = spec.noise * torch.randn(spec.batch, spec.kv_heads, spec.seq_k, spec.dim, generator=generator)
    v = torch.randn(spec.batch, spec.kv_heads, spec.seq_k, spec.dim, generator=generator)
    query_positions = torch.arange(spec.seq_q) + spec.offset
    key_positions = torch.arange(spec.seq_k)

    root_dim = spec.dim**0.5  # undoes the 1/sqrt(D) softmax scale
    q[..., _SINK] = 1.0
    k[:, :, : spec.sink_tokens, _SINK] = spec.sink_logit * root_dim
    if spec.vertical_position is not None:
        q[..., _VERTICAL] = 1.0
        column = slice(spec.vertical_position, spec.vertical_position + spec.vertical_width)
        k[:, :, column, _VERTICAL] = spec.vertical_logit * root_dim
    # Rotations: q·k = amplitude^2 * sum over frequencies of cos(angle * distance).
    amplitude = (spec.band_logit * root_dim / _FREQUENCIES) ** 0.5
    band = slice(_BAND, _BAND + 2 * _FREQUENCIES)
    q[..., band] += amplitude * _rotation(query_positions)
    k[..., band] += amplitude * _rotation(key_positions)
    if spec.slash_distance is not None:
        slash = slice(_SLASH, _SLASH + 2 * _FREQUENCIES)
        q[..., slash] += amplitude * _rotation(query_positions)
        k[..., slash] += amplitude * _rotation(key_positions + spec.slash_distance)
    if spec.needles:
        needle = (spec.needle_logit * root_dim) ** 0.5
        for head, (q_block, kv_block) in enumerate(needle_blocks(spec)):
            coordinate = _NEEDLE0 + (0 if spec.needle_shared_by_group else head % group)
            q[:, head, q_block * spec.block : (q_block + 1) * spec.block, coordinate] = needle
            k[:, head // group, kv_block * spec.block : (kv_block + 1) * spec.block, coordinate] = needle
    return q, k, v


def planted_blocks(spec: PlantedSpec) -> torch.Tensor:
    """Bool ``(Hq, n_q, n_kv)``: the blocks the planted structure makes dominant (causal only).

    Sinks (KV block 0), the vertical's block, each head's needle, the diagonal, and the
    blocks holding the slash keys of at least half of a query block's rows (a block the
    slash only grazes holds little mass).
    """
    n_q, n_kv = num_blocks(spec.seq_q, spec.block), num_blocks(spec.seq_k, spec.block)
    mask = torch.zeros(spec.q_heads, n_q, n_kv, dtype=torch.bool)
    mask[:, :, 0] = True
    q_first = torch.arange(n_q) * spec.block + spec.offset
    q_last = torch.clamp(torch.arange(n_q) * spec.block + spec.block, max=spec.seq_q) - 1 + spec.offset
    if spec.vertical_position is not None:
        column_blocks = torch.arange(spec.vertical_position, spec.vertical_position + spec.vertical_width) // spec.block
        for column_block in column_blocks.unique():
            mask[:, q_last >= column_block * spec.block, column_block] = True
    if spec.slash_distance is not None:
        for i in range(n_q):
            slash_keys = torch.arange(int(q_first[i]), int(q_last[i]) + 1) - spec.slash_distance
            blocks, rows = torch.unique(slash_keys[slash_keys >= 0] // spec.block, return_counts=True)
            rows_in_block = int(q_last[i] - q_first[i]) + 1
            mask[:, i, blocks[2 * rows >= rows_in_block]] = True
    if spec.needles:
        for head, (q_block, kv_block) in enumerate(needle_blocks(spec)):
            mask[head, q_block, kv_block] = True
    mask |= diagonal_block_mask(spec.seq_q, spec.seq_k, spec.block, spec.block)
    return mask & causal_block_mask(spec.seq_q, spec.seq_k, spec.block, spec.block)
