"""BLASST on the GPU: density actually computed, kernel time and output error at each threshold, against dense.

Batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16, causal, 128 x 128 blocks, at 32K and
128K by default, on the structured inputs of ``benchmarks/estimators.py`` (q and k share one
direction plus noise, then RoPE: attention concentrates locally and on the sequence start;
random q/k would give uniform attention and nothing to skip). The candidates are every causal
block (the paper's setting).

Per threshold ``λ``: the skipping kernel's time (:mod:`sparse_attn.backends.triton_blasst`,
``triton.testing.do_bench`` median), the density it actually computed (blocks computed over
causally valid blocks, from the kernel's per-query-block counts), the output's relative error
against dense attention (our dense Triton kernel's output), and its time against, measured in
the same run, our dense Triton kernel on the full causal pattern, dense cuDNN SDPA, and the
ideal ``density x dense kernel`` time. Thresholds: ``0`` (no skipping: the kernel's overhead
at zero sparsity), the paper's example operating points ``1e-5`` and ``1e-4``, ``1e-3``, and
the paper's length-scaled form ``a / L`` with the method's default ``a = 0.8`` (see
:mod:`sparse_attn.methods.blasst`).

Prints a table and writes JSON (``--output``, default ``benchmarks/results/<gpu>/blasst.json``).

    python benchmarks/blasst.py                           # 32K and 128K
    python benchmarks/blasst.py --lengths 32768 --output benchmarks/results/h200/blasst_32k.json
    python benchmarks/blasst.py --quick                   # tiny sizes, runs on CPU too (the reference rule)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sparse_attn as sa
import sparse_attn.methods.blasst  # noqa: F401  (registers blasst until methods/__init__ lists it)
from estimators import Shape, structured_qkv
from sparse_attn.bench import (
    dense_baselines,
    device_slug,
    environment,
    format_table,
    measure,
    relative_error,
    write_results,
)
from sparse_attn.methods.blasst import BlasstConfig, skip_threshold
from sparse_attn.skip_pattern import SkipThresholdPattern, computed_density, skip_threshold_attention

THRESHOLDS = ("0", "1e-5", "1e-4", "1e-3", "a/L")

COLUMNS = [
    ("seq", "seq", "d"),
    ("threshold", "threshold", "s"),
    ("lambda", "lambda", ".2e"),
    ("density", "density", ".3f"),
    ("blasst_ms", "blasst ms", ".2f"),
    ("dense_kernel_ms", "dense kernel ms", ".2f"),
    ("cudnn_ms", "cudnn ms", ".2f"),
    ("vs_dense_kernel", "speedup vs kernel", ".2f"),
    ("vs_cudnn", "speedup vs cudnn", ".2f"),
    ("vs_ideal", "time/ideal", ".2f"),
    ("output_error", "rel error", ".2e"),
]


def run_length(shape: Shape, thresholds: tuple[str, ...], *, strength: float, device: torch.device) -> list[dict]:
    q, k, v = structured_qkv(shape, strength=strength, device=device)
    candidates = sa.dense_pattern(
        seq_q=shape.seq, seq_k=shape.seq, block_q=shape.block, block_k=shape.block, device=device
    )
    backend = "triton" if device.type == "cuda" else "reference"
    scale = shape.head_dim**-0.5
    dense_out = sa.block_sparse_attention(q, k, v, candidates, backend=backend)
    dense_kernel_ms, dense_error = measure(
        lambda: sa.block_sparse_attention(q, k, v, candidates, backend=backend), device
    )
    cudnn_ms, cudnn_error = measure(next(iter(dense_baselines(q, k, v, device).values())), device)
    rows = []
    for label in thresholds:
        value = skip_threshold(BlasstConfig(), shape.seq) if label == "a/L" else float(label)
        pattern = SkipThresholdPattern.over(candidates, value)

        def run(pattern=pattern):
            return skip_threshold_attention(
                q, k, v, pattern, causal=True, scale=scale, backend="auto", return_computed=True
            )

        out, computed = run()
        density = computed_density(pattern, computed, causal=True)
        blasst_ms, error = measure(run, device)
        row = {
            "seq": shape.seq,
            "threshold": label,
            "lambda": value,
            "density": density,
            "blasst_ms": blasst_ms,
            "dense_kernel_ms": dense_kernel_ms,
            "cudnn_ms": cudnn_ms,
            "vs_dense_kernel": dense_kernel_ms / blasst_ms if blasst_ms and dense_kernel_ms else None,
            "vs_cudnn": cudnn_ms / blasst_ms if blasst_ms and cudnn_ms else None,
            "vs_ideal": blasst_ms / (density * dense_kernel_ms) if blasst_ms and dense_kernel_ms else None,
            "output_error": relative_error(out, dense_out),
            "backend": backend,
            "errors": [e for e in (error, dense_error, cudnn_error) if e] or None,
        }
        rows.append(row)
        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--thresholds", nargs="+", default=list(THRESHOLDS), help="floats, or a/L")
    parser.add_argument("--strength", type=float, default=12.0, help="norm of the shared q/k direction")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU too); no JSON unless --output")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/<gpu>/blasst.json)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        shapes = [Shape(seq=seq, q_heads=4, kv_heads=2, head_dim=64, block=32) for seq in (256, 512)]
    else:
        shapes = [Shape(seq=seq) for seq in args.lengths]
    print(format_table([], COLUMNS))
    rows = []
    for shape in shapes:
        rows += run_length(shape, tuple(args.thresholds), strength=args.strength, device=device)
    output = args.output
    if output is None and not args.quick:
        output = Path(__file__).parent / "results" / device_slug(device) / "blasst.json"
    if output is not None:
        meta = {
            "environment": environment(device),
            "shape": "B1, 32/8 heads, D128, bf16, causal, 128x128 blocks" if not args.quick else "quick",
            "inputs": f"structured (estimators.structured_qkv, strength {args.strength})",
            "candidates": "dense causal",
        }
        write_results(rows, output, meta)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
