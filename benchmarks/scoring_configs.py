"""Sweep the estimators' scoring kernel's configurations (GPU): which tile shape is fastest.

Times XAttention's antidiagonal block scoring (``antidiagonal_block_probs_triton``, stride 8,
128 x 128 blocks) for every candidate (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages) in the
kernel's autotune list (``SCORING_CONFIGS``, each passed alone as the kernel's ``configs=``)
on the estimator benchmark's shape (batch 1, 32/8 heads, head_dim 128, bf16, causal), next
to dense cuDNN attention in the same run. Reports the scoring throughput (TFLOP/s over the
causal antidiagonal products) and the share of dense time. Writes ``benchmarks/results/<gpu>/scoring_configs.json``.

    python benchmarks/scoring_configs.py --lengths 131072
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from sparse_attn.bench import dense_baselines, device_slug, environment, measure, time_ms, write_results
from sparse_attn.ops.antidiagonal.triton import SCORING_CONFIGS, antidiagonal_block_probs_triton


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for seq in args.lengths:
        q = torch.randn(1, 32, seq, args.dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, 8, seq, args.dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        dense_ms = time_ms(dense_baselines(q, k, v, device)["sdpa-cudnn"], device)
        # Causal antidiagonal products: (cells^2 / 2) cell pairs x stride x head_dim multiply-adds, per head.
        cells = seq // args.stride
        flops = 2 * 32 * (cells * cells / 2) * args.stride * args.dim
        print(f"seq {seq}: dense cuDNN {dense_ms:.2f} ms; scoring {flops / 1e12:.2f} TFLOP", flush=True)
        options = dict(stride=args.stride, block_q=128, block_k=128, scale=args.dim**-0.5, causal=True)
        for config in SCORING_CONFIGS:
            score = functools.partial(antidiagonal_block_probs_triton, q, k, **options, configs=[config])
            # A tile that does not fit shared memory or registers is reported, not fatal.
            ms, note = measure(score, device)
            tflops = flops / (ms * 1e-3) / 1e12 if ms else None
            share = ms / dense_ms if ms else None
            row = {"seq": seq, "config": config, "scoring_ms": ms, "tflops": tflops, "dense_ms": dense_ms}
            rows.append({**row, "share_of_dense": share, "error": note})
            label = f"M={config[0]:3d} N={config[1]:3d} D={config[2] or args.dim:3d} w={config[3]} s={config[4]}"
            shown = f"{ms:7.2f} ms {tflops:5.0f} TFLOP/s {ms / dense_ms:6.1%} of dense" if ms else note
            print(f"  {label}: {shown}", flush=True)
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "scoring_configs.json"
    write_results(rows, out, {"benchmark": "scoring_configs", **environment(device)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
