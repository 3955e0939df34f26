"""The ``sparse-attn`` command line: ``bench`` (kernels vs dense) and ``methods`` (the registry)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _bench(args: argparse.Namespace) -> int:
    from .bench import KernelCase, device_slug, environment, format_table, kernel_columns, run_kernel_case, write_results

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        backends, dense = ("triton", "flex"), ("sdpa-cudnn", "sdpa-flash")
        lengths = args.lengths or ([4096, 16384] if args.quick else [8192, 32768, 65536, 131072])
        case = dict(q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", block=128)
    else:
        # CPU: the compiled FlexAttention path against the reference, at sizes a laptop runs in seconds.
        backends, dense = ("flex", "reference"), ("sdpa",)
        lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192])
        case = dict(q_heads=8, kv_heads=2, head_dim=64, dtype="float32", block=128)
    densities = tuple(args.densities or ((0.1, 0.3, 1.0) if args.quick else (0.05, 0.1, 0.2, 0.5, 1.0)))
    print(f"sparse-attn bench on {device} ({'quick' if args.quick else 'full'}): batch 1, "
          f"{case['q_heads']}/{case['kv_heads']} heads, head_dim {case['head_dim']}, {case['dtype']}, causal, "
          f"random block patterns of {case['block']}; medians in ms", flush=True)  # fmt: skip
    start = time.perf_counter()
    rows = []
    for seq in lengths:
        rows += run_kernel_case(KernelCase(seq=seq, densities=densities, **case), backends, device)
    print(format_table(rows, kernel_columns(backends, dense)))
    for row in rows:
        if row["errors"]:
            print(f"  seq {row['seq']} density {row['density']}: {row['errors']}")
    if args.out is not None:
        write_results(rows, args.out, {"benchmark": "kernels", **environment(device)})
        print(f"wrote {args.out}")
    print(f"({time.perf_counter() - start:.0f} s; results folder name for this device: {device_slug(device)})")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .registry import list_methods

    for method in list_methods():
        defaults = ", ".join(f"{name}={value!r}" for name, value in method.defaults().items()) or "no options"
        print(f"{method.name}\n    {method.summary}\n    paper: {method.paper}\n    defaults: {defaults}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attn", description="Block-sparse attention for long-context prefill.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time block-sparse backends against dense attention")
    bench.add_argument("--quick", action="store_true", help="a small grid (under 2 minutes on a 2-core CPU)")
    bench.add_argument("--lengths", type=int, nargs="+", help="sequence lengths")
    bench.add_argument("--densities", type=float, nargs="+", help="pattern densities (1.0 = dense)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--out", type=Path, help="also write the rows as JSON here")
    bench.set_defaults(run=_bench)
    methods = commands.add_parser("methods", help="list the registered methods with their papers and defaults")
    methods.set_defaults(run=_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
