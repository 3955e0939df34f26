"""Fidelity of the spatial methods against dense attention on synthetic video q/k/v (CPU or GPU).

Synthetic, not a real model: no video DiT weights are available offline here. The inputs have
the structure the methods assume: q and k are one projection of a smooth random
field over the (T, H, W) grid (box-filtered noise, so nearby tokens have similar features,
plus per-token noise), a few *global* grid tokens whose keys carry a component every query
matches (attention sinks), and text tokens after the video with keys of moderate alignment.
Per method and setting (defaults, and tighter or looser ones): density (the exactly computed
blocks; for ``psa`` / ``sla`` also the pooled or linear blocks' share), the relative L2
error of the output against dense attention, and (block-sparse methods) the recall (mean over queries of the dense
softmax mass on the keys the method keeps, from the two log-sum-exps). Reference backend,
float32. Writes ``benchmarks/results/<device>/spatial_fidelity.json``.

    python benchmarks/spatial_fidelity.py            # grid 8 x 24 x 32 + 64 text tokens
    python benchmarks/spatial_fidelity.py --grid 12 32 48 --device cuda
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, format_table, write_results
from sparse_attn.compensated_pattern import CompensatedPattern

COLUMNS = [
    ("method", "method", "s"),
    ("setting", "setting", "s"),
    ("density", "density", ".3f"),
    ("compensated_density", "compensated", ".3f"),
    ("rel_error", "rel. L2 error", ".4f"),
    ("recall", "recall", ".4f"),
    ("min_recall", "min recall", ".4f"),
]


def synthetic_qkv(grid, text_tokens: int, heads: int, dim: int, *, seed: int, device) -> tuple[torch.Tensor, ...]:
    """``(q, k, v)`` float32 ``(1, heads, T*H*W + text, dim)`` with local 3D correlation, global and text tokens."""
    generator = torch.Generator().manual_seed(seed)
    channels = 32
    field = torch.randn(1, channels, *grid, generator=generator)
    for _ in range(2):  # two box filters: correlation over a few tokens per dimension
        field = F.avg_pool3d(field, kernel_size=(3, 5, 5), stride=1, padding=(1, 2, 2), count_include_pad=False)
    field = field / field.std()
    tokens = field.flatten(2).transpose(1, 2)[0]  # (N, channels)
    n = tokens.shape[0]
    # q and k share one projection (so a token matches its neighbours, whose features are alike); v has its own.
    shared, values = (torch.randn(channels, dim, generator=generator) / channels**0.5 for _ in range(2))
    q, k, v = (tokens @ p + 0.3 * torch.randn(n, dim, generator=generator) for p in (shared, shared, values))
    q, k, v = (x[None].expand(heads, n, dim).clone() for x in (q, k, v))
    # Logits are q.k / sqrt(dim): about dim / sqrt(dim) = 8 between a token and itself, falling off with
    # distance; a shared unit direction adds about 5 to the few global keys and 2 to the text keys.
    direction = torch.randn(dim, generator=generator)
    direction = direction / direction.norm()
    q += 2.0 * direction
    sinks = torch.randperm(n, generator=generator)[:4]
    k[:, sinks] += 20.0 * direction
    text_k = torch.randn(heads, text_tokens, dim, generator=generator) + 8.0 * direction
    text_q = torch.randn(heads, text_tokens, dim, generator=generator)
    text_v = torch.randn(heads, text_tokens, dim, generator=generator)
    q, k, v = (torch.cat([x, t], 1) for x, t in ((q, text_q), (k, text_k), (v, text_v)))
    # Per-head scale (logits times 1 to 2): sharper heads attend more locally.
    scale = torch.linspace(1.0, 2.0, heads).sqrt()[:, None, None]
    return tuple(x[None].to(device) for x in (q * scale, k * scale, v))


def settings(grid) -> list[tuple[str, str, dict]]:
    rank = len(grid)
    rows = [
        ("neighborhood", "defaults (window 7)", {}),
        ("neighborhood", "window (3, 7, 7)", dict(window=(3, 7, 7))),
        ("neighborhood", "window (3, 13, 13)", dict(window=(3, 13, 13))),
        ("neighborhood", "window (3, 7, 7) dilation (1, 2, 2)", dict(window=(3, 7, 7), dilation=(1, 2, 2))),
        ("neighborhood", "GNA block-exact", dict(window=(2, 24, 24), stride=(2, 8, 8), tile=(2, 8, 8))),
        ("sliding_tile", "tile (2, 8, 8) window (3, 3, 3)", dict(tile=(2, 8, 8), window=(3, 3, 3))),
        ("sliding_tile", "tile (2, 8, 8) window (1, 3, 3)", dict(tile=(2, 8, 8), window=(1, 3, 3))),
        ("radial", "defaults", {}),
        ("radial", "decay_factor 0.25", dict(decay_factor=0.25)),
        ("vmoba", "layer 0 (1D, 2 frames)", dict(layer=0, chunk_1d=2)),
        ("vmoba", "layer 1 (2D, 4x4)", dict(layer=1)),
        ("vmoba", "layer 2 (3D, 2x4x8)", dict(layer=2, chunk_3d=(2, 4, 8))),
        ("vmoba", "layer 1, threshold 0.5", dict(layer=1, threshold=0.5)),
        ("svg", "defaults (density 0.25)", {}),
        ("svg", "density 0.5", dict(density=0.5)),
        ("sparse_vdit", "defaults (multi-diagonal, width 0.125)", {}),
        ("sparse_vdit", "multi-diagonal, width 0.25", dict(width=0.25)),
        ("draft", "defaults (sparsity 0.9)", {}),
        ("draft", "sparsity 0.75", dict(sparsity=0.75)),
        ("draft", "sparsity 0.75, per-row selection", dict(sparsity=0.75, selection="row")),
        ("psa", "defaults", {}),
        ("psa", "thresholds (0.3, 0.4, 0.5, 0.6)", dict(thresholds=(0.3, 0.4, 0.5, 0.6))),
        ("psa", "level 0 only (threshold 0.4)", dict(thresholds=(0.4,))),
        ("sla", "defaults (zero Proj = top-5% blocks)", {}),
        ("sla", "critical 0.2", dict(critical=0.2)),
        ("sla", "identity Proj, 64-token blocks", dict(projection="identity", block_q=64, block_k=64)),
    ]
    return rows if rank == 3 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, nargs=3, default=[8, 24, 32])
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    grid = tuple(args.grid)
    q, k, v = synthetic_qkv(grid, args.text_tokens, args.heads, args.head_dim, seed=args.seed, device=device)
    seq = q.shape[2]
    dense = sa.dense_pattern(seq_q=seq, causal=False, device=device)
    reference, dense_lse = sa.block_sparse_attention(q, k, v, dense, causal=False, backend="reference", return_lse=True)
    rows = []
    for method, setting, options in settings(grid):
        call = dict(causal=False, grid=grid, text_tokens=args.text_tokens, **options)
        try:
            pattern = sa.estimate(q, k, method, **call)
        except ValueError as error:
            rows.append({"method": method, "setting": setting, "error": str(error)})
            continue
        out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference", return_lse=True)
        row = {
            "method": method,
            "setting": setting,
            "options": repr(options),
            "density": pattern.density(causal=False),
            "rel_error": float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference)),
        }
        if isinstance(pattern, CompensatedPattern):
            # Pooled / linear blocks stand in for skipped ones: the LSE is no longer a recall.
            row["compensated_density"] = pattern.compensated_density()
        else:
            recall = torch.exp(lse - dense_lse)  # dense softmax mass on the kept keys, per query
            row.update(recall=float(recall.mean()), min_recall=float(recall.min()))
        rows.append(row)
        print(format_table(rows[-1:], COLUMNS), flush=True)
    print()
    print(format_table([row for row in rows if "error" not in row], COLUMNS))
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "spatial_fidelity.json"
    meta = {"benchmark": "spatial_fidelity", "inputs": "synthetic", **vars(args), "grid": grid}
    write_results(rows, out, {**{key: str(value) for key, value in meta.items()}, **environment(device)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
