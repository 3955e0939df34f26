"""Sweep the estimators' scoring kernel's configurations (GPU): which tile shape is fastest.

Times XAttention's antidiagonal block scoring (``antidiagonal_block_probs_triton``, stride 8,
128 x 128 blocks) for every candidate (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages) in the
kernel's autotune list (``SCORING_CONFIGS``, or ``FP8_SCORING_CONFIGS`` with ``--precision
fp8``; each passed alone as the kernel's ``configs=``) in each load mode (``--loads``: row-strided
pointer loads, TMA tensor descriptors) and each way of taking the epilogue's exponentials
(``--exp2``: ``f16x2``, two per half-precision instruction; ``f32``, the default) on the estimator benchmark's shape (batch 1, 32/8 heads, head_dim 128, bf16, causal), next
to dense cuDNN attention in the same run. Reports the scoring throughput (TFLOP/s over the
causal antidiagonal products) and the share of dense time. Writes ``benchmarks/results/<gpu>/scoring_configs.json``.

    python benchmarks/scoring_configs.py --lengths 131072
    python benchmarks/scoring_configs.py --lengths 131072 --precision fp8 --loads tma
    python benchmarks/scoring_configs.py --lengths 131072 --first 3 --loads pointers --exp2 f16x2 f32
"""

from __future__ import annotations

import argparse
import functools
import itertools
from pathlib import Path

import torch

from sparse_attn.bench import dense_baselines, device_slug, environment, measure, time_ms, write_results
from sparse_attn.ops.antidiagonal import triton as scoring_kernel
from sparse_attn.ops.antidiagonal.naive import fp8_keys
from sparse_attn.ops.antidiagonal.triton import (
    FP8_SCORING_CONFIGS,
    LOAD_MODES,
    SCORING_CONFIGS,
    antidiagonal_block_probs_triton,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--precision", choices=["input", "fp8"], default="input", help="score_precision")
    parser.add_argument("--loads", choices=LOAD_MODES, nargs="+", default=list(LOAD_MODES))
    parser.add_argument("--exp2", choices=["f16x2", "f32"], nargs="+", default=["f32"], help="epilogue exponentials")
    parser.add_argument("--first", type=int, default=None, help="sweep only the first N candidates")
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
        configs = SCORING_CONFIGS
        if args.precision == "fp8":  # the keys' codes are made once per estimate; the queries' per call (timed)
            options.update(score_precision="fp8", keys_fp8=fp8_keys(k))
            configs = FP8_SCORING_CONFIGS
        for config, loads, exp2 in itertools.product(configs[: args.first], args.loads, args.exp2):
            scoring_kernel.FAST_EXP2 = exp2 == "f16x2"
            score = functools.partial(antidiagonal_block_probs_triton, q, k, **options, configs=[config], loads=loads)
            # A tile that does not fit shared memory or registers is reported, not fatal.
            ms, note = measure(score, device)
            tflops = flops / (ms * 1e-3) / 1e12 if ms else None
            share = ms / dense_ms if ms else None
            row = {"seq": seq, "config": config, "loads": loads, "precision": args.precision, "exp2": exp2}
            row["scoring_ms"] = ms
            rows.append({**row, "tflops": tflops, "dense_ms": dense_ms, "share_of_dense": share, "error": note})
            label = f"M={config[0]:3d} N={config[1]:3d} D={config[2] or args.dim:3d} w={config[3]} s={config[4]} {loads:8s} {exp2:5s}"
            shown = f"{ms:7.2f} ms {tflops:5.0f} TFLOP/s {ms / dense_ms:6.1%} of dense" if ms else note
            print(f"  {label}: {shown}", flush=True)
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "scoring_configs.json"
    write_results(rows, out, {"benchmark": "scoring_configs", **environment(device)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
