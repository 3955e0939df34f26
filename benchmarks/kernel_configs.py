"""Sweep the Triton kernel's tile configurations (GPU): which (BLOCK_M, BLOCK_N, warps, stages) is fastest.

For each head_dim, length and density, times every candidate configuration (tile sizes,
warps, pipeline stages, and the load mode: pointer loads with K read row-wise or
column-wise, or TMA descriptor loads where the kernel offers them, i.e. on compute capability
>= 9) of the block-sparse kernel on one random causal
pattern (batch 1, 32/8 heads, bf16, blocks of 128), next to FlexAttention on the same pattern.
Each configuration runs alone through ``sparse_attn.backends.kernel_configs`` around
``backend="triton"`` (the portable Triton kernel). The winners inform the autotuning lists in
``sparse_attn/backends/configs.py``. Writes ``benchmarks/results/<gpu>/kernel_configs.json``.

    python benchmarks/kernel_configs.py --dims 128 --lengths 32768 131072 --densities 0.05 0.2
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.backends import kernel_configs
from sparse_attn.backends.triton import tma_offered
from sparse_attn.bench import device_slug, environment, measure, time_ms, write_results
from sparse_attn.utils import device_capability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[128])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for dim, seq, density in itertools.product(args.dims, args.lengths, args.densities):
        q = torch.randn(1, 32, seq, dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, 8, seq, dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        pattern = sa.random_pattern(heads=8, seq_q=seq, density=density, seed=0, device=device)
        flex_ms = time_ms(partial(sa.block_sparse_attention, q, k, v, pattern, backend="flex"), device)
        print(f"dim {dim} seq {seq} density {pattern.density():.3f}: flex {flex_ms:.2f} ms", flush=True)
        wide = 128 if dim <= 128 else 64
        candidates = [
            (m, n, w, s)
            for m in (64, 128)
            for n in (32, 64, 128)
            for w in (4, 8)
            for s in (2, 3)
            if n <= wide and not (m == 64 and w == 8) and not (dim == 256 and m == 128 and n == 128)
        ]
        # Pointer loads with K row-wise and column-wise, then TMA descriptor loads if offered.
        modes = ["rows", "columns"] + ["tma"] * tma_offered(q, k, v, device_capability(device))
        for config, mode in itertools.product(candidates, modes):
            with kernel_configs(triton_tiles=[config], triton_loads=[mode]):
                # A tile that does not fit shared memory or registers is reported, not fatal.
                ms, note = measure(partial(sa.block_sparse_attention, q, k, v, pattern, backend="triton"), device)
            rows.append(
                {
                    "head_dim": dim,
                    "seq": seq,
                    "density": round(pattern.density(), 4),
                    "config": config,
                    "k_transposed": mode == "columns",
                    "tma": mode == "tma",
                    "triton_ms": ms,
                    "flex_ms": flex_ms,
                    "error": note,
                }
            )
            shown = f"{ms:8.2f} ms  ({flex_ms / ms:.2f}x flex)" if ms else note
            label = f"BLOCK_M={config[0]:3d} BLOCK_N={config[1]:3d} warps={config[2]} stages={config[3]} loads={mode}"
            print(f"  {label}: {shown}", flush=True)
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "kernel_configs.json"
    write_results(rows, out, {"benchmark": "kernel_configs", **environment(device)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
