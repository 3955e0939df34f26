"""Forward + backward of block-sparse attention against dense attention (GPU).

Batch 1, 32 query heads, 8 KV heads, bf16, causal, random causal block patterns (128 x 128
blocks, one list per KV head) at densities 0.05 / 0.1 / 0.2 plus dense, at 32K and 128K with
head_dim 128, and 32K with head_dim 64. One timed call is ``out = attention(q, k, v);
out.backward(dout)`` with gradients for q, k and v (reset between calls). Columns: our
backends (``auto``: on Hopper the Gluon forward with, at head_dim 128, the Gluon backward
passes, the Triton ones at 64; ``triton``: the Triton forward and backward), FlexAttention on
the same pattern (its own backward), dense
SDPA with cuDNN and with FlashAttention on K/V expanded to the query heads (the expansion
outside the timing), and the forward alone of our ``auto`` backend. Where FlashAttention-4 is
installed: the ``flash4`` backend (FlexAttention's FLASH backend on the same pattern, FA4's own
backward, see :mod:`sparse_attn.backends.flash4`) and
FA4's dense kernel forward + backward. Each backend's gradients are compared with the first
backend's (largest relative Frobenius error of dQ, dK, dV). Medians from
``triton.testing.do_bench``. Writes ``benchmarks/results/<gpu>/training.json``.

    python benchmarks/training.py
    python benchmarks/training.py --lengths 32768 --densities 0.1
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_attn import block_sparse_attention, dense_pattern, random_pattern
from sparse_attn.backends import flash4, kernel_configs
from sparse_attn.bench import (
    add_waves_argument,
    backend_variant,
    device_slug,
    environment,
    format_table,
    measure,
    relative_error,
    waves_label,
    write_results,
)


def _forward_backward(attention, q, k, v, dout):
    out = attention(q, k, v)
    out.backward(dout)


def _gradients(attention, q, k, v, dout, overrides):
    q.grad = k.grad = v.grad = None
    with kernel_configs(**overrides):
        _forward_backward(attention, q, k, v, dout)
    return [x.grad.clone() for x in (q, k, v)]


def _fa4_forward_backward(q, k, v, dout):
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v, causal=True)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(dout)


def _sdpa(choice, q, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(choice):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def run_case(seq: int, head_dim: int, densities, backends, device, *, q_heads=32, kv_heads=8, seed=0) -> list[dict]:
    from torch.nn.attention import SDPBackend

    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(heads):
        x = torch.randn(1, heads, seq, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
        return x.requires_grad_()

    q, k, v = draw(q_heads), draw(kv_heads), draw(kv_heads)
    dout = torch.randn_like(q)
    group = q_heads // kv_heads
    k_full = k.detach().repeat_interleave(group, 1).requires_grad_()
    v_full = v.detach().repeat_interleave(group, 1).requires_grad_()
    dense = {}
    for name, choice in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        run = partial(_forward_backward, partial(_sdpa, choice), q, k_full, v_full, dout)
        dense[name] = measure(run, device)
    if flash4.installed() is None:  # FA4's dense kernel, its own layout made outside the timing
        q_t, k_t, v_t = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dense["fa4-dense"] = measure(partial(_fa4_forward_backward, q_t, k_t, v_t, dout.transpose(1, 2)), device)
    rows = []
    for density in densities:
        pattern = (
            dense_pattern(seq_q=seq, device=device)
            if density >= 1.0
            else random_pattern(heads=kv_heads, seq_q=seq, density=density, seed=seed, device=device)
        )
        row = {"seq": seq, "head_dim": head_dim, "density": round(pattern.density(), 4), "errors": {}}
        first_grads = None  # the first backend's gradients, which the others are checked against
        for backend in backends:
            backend_name, overrides = backend_variant(backend)
            refused = flash4.gradient_unsupported_reason(q) if backend_name == "flash4" else None
            if refused:  # it would fall back to another backend: timing that under this name would mislead
                row[f"{backend}_ms"], row["errors"][backend] = None, f"refused: {refused}"
                continue
            attention = partial(block_sparse_attention, pattern=pattern, backend=backend_name)
            with kernel_configs(**overrides):
                row[f"{backend}_ms"], error = measure(partial(_forward_backward, attention, q, k, v, dout), device)
            if error:
                row["errors"][backend] = error
            else:
                grads = _gradients(attention, q, k, v, dout, overrides)
                if first_grads is None:
                    first_grads = grads
                else:  # a fast path that is fast because it is wrong shows here
                    row[f"{backend}_grad_error"] = max(map(relative_error, grads, first_grads))
            q.grad = k.grad = v.grad = None
        with torch.no_grad():
            row["auto_forward_ms"], _ = measure(partial(block_sparse_attention, q, k, v, pattern), device)
        for name, (ms, error) in dense.items():
            row[f"{name}_ms"] = ms
            if error:
                row["errors"][name] = error
        cudnn = row["sdpa-cudnn_ms"]
        for backend in backends:
            mine = row[f"{backend}_ms"]
            row[f"{backend}_vs_ideal"] = None if mine is None or cudnn is None else mine / (pattern.density() * cudnn)
        if row.get("auto_ms") and row.get("flex_ms"):
            row["auto_speedup_vs_flex"] = row["flex_ms"] / row["auto_ms"]
        rows.append(row)
        print(format_table([row], _columns(backends)).splitlines()[-1], flush=True)
    return rows


def _columns(backends):
    columns = [("seq", "seq", "d"), ("head_dim", "dim", "d"), ("density", "density", ".3f")]
    columns += [(f"{name}_ms", f"{name} fwd+bwd ms", ".2f") for name in backends]
    columns += [("sdpa-cudnn_ms", "cuDNN dense fwd+bwd ms", ".2f"), ("sdpa-flash_ms", "flash dense fwd+bwd ms", ".2f")]
    columns += [("fa4-dense_ms", "FA4 dense fwd+bwd ms", ".2f")]
    columns += [("auto_forward_ms", "auto fwd ms", ".2f"), ("auto_vs_ideal", "auto / (density x cuDNN)", ".2f")]
    columns += [("auto_speedup_vs_flex", "auto vs flex (x faster)", ".2f")]
    columns += [(f"{name}_grad_error", f"{name} grad rel. err. vs {backends[0]}", ".1e") for name in backends[1:]]
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 1.0])
    parser.add_argument("--extra-dims", type=int, nargs="*", default=[64], help="head dims at --extra-length")
    parser.add_argument("--extra-length", type=int, default=32768)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["auto", "triton", "flex"],
        help="backends; NAME+KEY=VALUE runs NAME under kernel_configs(KEY=VALUE), e.g. auto+kv_streams_per_wave=0",
    )
    parser.add_argument(
        "--backward-skip-masked",
        action="store_true",
        help="our Triton backward branches around causally masked tile pairs (the earlier default)",
    )
    add_waves_argument(parser)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    cases = [(seq, 128) for seq in args.lengths] + [(args.extra_length, dim) for dim in args.extra_dims]
    backends = tuple(args.backends)
    if flash4.installed() is None and "flash4" not in backends:
        backends += ("flash4",)
    print(format_table([], _columns(backends)), flush=True)
    path = args.output or Path(__file__).parent / "results" / device_slug(device) / "training.json"
    settings = {
        "benchmark": "training",
        "backward_skip_masked": args.backward_skip_masked,
        "kv_streams_per_wave": waves_label(args.kv_streams_per_wave),
        **environment(device),
    }
    rows = []
    with kernel_configs(
        triton_backward_skip_masked=args.backward_skip_masked, kv_streams_per_wave=args.kv_streams_per_wave
    ):
        for seq, dim in cases:
            rows += run_case(seq, dim, args.densities, backends, device)
            write_results(rows, path, settings)  # after every case: a run cut by a time limit keeps its rows
    print()
    print(format_table(rows, _columns(backends)))
    for row in rows:
        for name, error in row["errors"].items():
            print(f"  {row['seq']} d{row['head_dim']} {row['density']}: {name}: {error}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
