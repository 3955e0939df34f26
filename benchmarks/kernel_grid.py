"""Block-sparse kernels against dense attention (GPU).

Batch 1, 32 query heads, 8 KV heads, bf16, causal, random causal block patterns (128 x 128
blocks, one list per KV head) at densities 0.05 / 0.1 / 0.2 / 0.5 plus dense; head_dim 128
at 8K-128K, and head_dim 64 and 256 at 32K. Columns: the ``auto`` backend as users get it (on
Hopper the Gluon kernel where it applies, else the Triton kernel; the row's ``auto_backend``
says which; ``--kernels both`` times ``backend="gluon"`` and ``backend="triton"`` separately)
and FlexAttention on the same pattern (where FlashAttention-4 is installed, also the ``flash4``
backend: FlexAttention's FLASH backend on the same pattern, and FA4's dense kernel), dense SDPA
with cuDNN and with FlashAttention, the first
column's throughput over the pairs it computes, and speedups against cuDNN. A backend that
cannot run a case (the Gluon kernel off Hopper, say) shows ``-`` and its reason. Medians from
``triton.testing.do_bench``. Writes ``benchmarks/results/<gpu>/kernels.json``.

    python benchmarks/kernel_grid.py                     # the full grid
    python benchmarks/kernel_grid.py --lengths 32768 --dims 128
    python benchmarks/kernel_grid.py --lengths 131072 --extra-dims --loads tma   # TMA descriptor loads only
    python benchmarks/kernel_grid.py --lengths 32768 131072 --kernels both       # Gluon vs Triton kernel
    python benchmarks/kernel_grid.py --kernels both --also auto gluon+gluon_persistent=false   # more columns
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sparse_attn.backends import flash4, kernel_configs
from sparse_attn.bench import (
    KernelCase,
    add_waves_argument,
    device_slug,
    environment,
    format_table,
    kernel_columns,
    run_kernel_case,
    waves_label,
    write_results,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--dims", type=int, nargs="+", default=[128], help="head dims at every length")
    parser.add_argument("--extra-dims", type=int, nargs="*", default=[64, 256], help="head dims at --extra-length")
    parser.add_argument("--extra-length", type=int, default=32768)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0])
    parser.add_argument(
        "--loads",
        choices=["autotuned", "pointer", "tma"],
        default="autotuned",
        help="the Triton kernel's tile loads: autotuned over pointer and TMA configs (default), or only one kind",
    )
    parser.add_argument(
        "--kernels",
        choices=("auto", "both", "gluon"),
        default="auto",
        help="auto: the auto backend as users get it; both: the gluon (Hopper) and triton backends side by side; "
        "gluon: the Gluon kernel alone (with --gluon-descriptors)",
    )
    parser.add_argument(
        "--gluon-descriptors",
        choices=("auto", "device"),
        default="auto",
        help="the Gluon kernel's TMA descriptors: made once at launch where they apply (auto), or per program (device)",
    )
    parser.add_argument(
        "--gluon-persistent",
        choices=("auto", "on", "off"),
        default="auto",
        help="the persistent Gluon kernel (one program per SM): on light work items (auto), always, or never",
    )
    add_waves_argument(parser)
    parser.add_argument(
        "--also",
        nargs="*",
        default=[],
        help="more columns: backends or backend variants such as auto or gluon+gluon_persistent=false "
        "(a backend and kernel_configs overrides), timed on the same patterns after the --kernels columns",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>/kernels.json)"
    )
    args = parser.parse_args()
    loads = {"autotuned": None, "pointer": ("rows", "columns"), "tma": ("tma",)}[args.loads]
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_grid.py needs a CUDA GPU; on CPU run `sparse-attn bench --quick`")
    device = torch.device("cuda")
    cases = [
        KernelCase(seq=seq, head_dim=dim, densities=tuple(args.densities)) for dim in args.dims for seq in args.lengths
    ]
    cases += [
        KernelCase(seq=args.extra_length, head_dim=dim, densities=tuple(args.densities)) for dim in args.extra_dims
    ]
    backends = {"both": ("gluon", "triton", "flex"), "auto": ("auto", "flex"), "gluon": ("gluon",)}[args.kernels]
    backends += tuple(args.also)
    dense_names = ("sdpa-cudnn", "sdpa-flash")
    if (
        flash4.installed() is None and args.kernels != "gluon"
    ):  # FlashAttention-4: FlexAttention's FLASH backend, and its dense kernel
        backends += ("flash4",)
        dense_names += ("fa4-dense",)
    columns = kernel_columns(backends, dense_names)
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "kernels.json"
    settings = {
        "benchmark": "kernels",
        "loads": args.loads,
        "kernels": args.kernels,
        "gluon_descriptors": args.gluon_descriptors,
        "gluon_persistent": args.gluon_persistent,
        "kv_streams_per_wave": waves_label(args.kv_streams_per_wave),
        "also": args.also,
        **environment(device),
    }
    rows = []
    for case in cases:
        host_descriptors = None if args.gluon_descriptors == "auto" else False
        with kernel_configs(
            triton_loads=loads,
            gluon_host_descriptors=host_descriptors,
            gluon_persistent={"auto": None, "on": True, "off": False}[args.gluon_persistent],
            kv_streams_per_wave=args.kv_streams_per_wave,
        ):
            case_rows = run_kernel_case(case, backends, device)
        torch.cuda.empty_cache()  # the case's tensors are gone: return their memory before the next length
        rows += case_rows
        print(format_table(case_rows, columns), flush=True)
        for row in case_rows:
            if row["errors"]:
                print("  errors:", row["errors"])
        write_results(rows, out, settings)  # after every case: a run cut by a time limit keeps its rows
    print()
    print(format_table(rows, columns))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
