"""VMoBA's estimate and token kernel at a video shape, with the autotuned kernel configuration (GPU).

Per VMoBA layer (1D, 2D; ``--layers``): the estimate's time with the head-global cut as shipped
(a histogram, then a sort of the candidate pairs only) and with one sort over every pair (the
plain rule, :func:`sparse_attn.methods.vmoba.sorted_cut`), whether both give the same pattern,
the attention's forward time on that pattern (``sa.block_sparse_attention``, permutations
included, estimate excluded) and the configuration the gathered forward kernel's autotuner chose
for it, beside dense cuDNN SDPA in the same run. Random bf16 q/k/v, batch 1, head_dim 128; the
shapes are :mod:`benchmarks.spatial`'s. Medians of ``triton.testing.do_bench``. Writes
``benchmarks/results/<gpu>/vmoba_kernel.json`` (``--out``).

    python benchmarks/vmoba_kernel.py --shape hunyuan-720p
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.bench import device_slug, time_ms
from sparse_attn.layouts import Layout
from sparse_attn.methods import vmoba

LAYERS = {
    "1d": dict(layer=0, chunk_1d=3),
    "2d": dict(layer=1, chunk_2d=(3, 8)),
}
SHAPES = {
    "hunyuan-720p": dict(grid=(30, 48, 80), heads=24, text_tokens=256),
    "wan21-720p": dict(grid=(21, 45, 80), heads=40, text_tokens=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="hunyuan-720p")
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYERS), default=["2d", "1d"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/vmoba_kernel.py needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparse_attn.backends import triton_tokens_gathered

    warnings.simplefilter("ignore")
    device = torch.device("cuda")
    shape = SHAPES[args.shape]
    layout = Layout(shape["grid"], text_tokens=shape["text_tokens"])
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(1, shape["heads"], layout.seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)
    print(f"{args.shape}: cuDNN dense {cudnn:.2f} ms", flush=True)
    path = args.out or Path(__file__).parent / "results" / device_slug(device) / "vmoba_kernel.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    shipped_cut = vmoba._global_cut
    for layer in args.layers:
        options = dict(
            causal=False, grid=shape["grid"], text_tokens=shape["text_tokens"], text_position="after", **LAYERS[layer]
        )
        try:
            vmoba._global_cut = vmoba.sorted_cut  # one sort over every pair
            plain = sa.estimate(q, k, "vmoba", **options)
            plain_ms = time_ms(lambda options=options: sa.estimate(q, k, "vmoba", **options), device)
        finally:
            vmoba._global_cut = shipped_cut
        pattern = sa.estimate(q, k, "vmoba", **options)
        same = torch.equal(pattern.kv_counts, plain.kv_counts) and torch.equal(pattern.kv_indices, plain.kv_indices)
        del plain
        estimate_ms = time_ms(lambda options=options: sa.estimate(q, k, "vmoba", **options), device)
        forward_ms = time_ms(lambda pattern=pattern: sa.block_sparse_attention(q, k, v, pattern, causal=False), device)
        density = float(pattern.density(causal=False))
        loads = triton_tokens_gathered._load_choices(q, k, v)  # the load kinds the call offered
        tuned = triton_tokens_gathered._autotuned("forward", False, triton_tokens_gathered.GATHER_ROWS, loads)
        row = dict(
            shape=args.shape,
            layer=layer,
            options=str(LAYERS[layer]),
            density=density,
            estimate_ms=estimate_ms,
            estimate_full_sort_ms=plain_ms,
            same_pattern=bool(same),
            fwd_ms=forward_ms,
            cudnn_ms=cudnn,
            kernel_vs_density_x_cudnn=forward_ms / (density * cudnn),
            gathered_forward_config=str(getattr(tuned, "best_config", None)),
        )
        print(
            f"{layer}: density {density:.3f}, estimate {estimate_ms:.2f} ms (full sort {plain_ms:.2f}, same "
            f"pattern: {same}), forward {forward_ms:.2f} ms = {row['kernel_vs_density_x_cudnn']:.2f}x density x "
            f"cuDNN; gathered forward config {row['gathered_forward_config']}",
            flush=True,
        )
        rows.append(row)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
        path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
