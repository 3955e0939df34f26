"""Spatial methods (neighborhood, sliding_tile, radial, vmoba, svg, sparse_vdit, draft, psa, sla) at DiT shapes (GPU).

Bidirectional (``causal=False``), bf16, batch 1, head_dim 128; random q/k/v. The static methods
keep one list for every head, so their speed does not depend on the values; svg and draft
choose per head from q/k (on random inputs: a timing of their estimate and of patterns of
their density, not of their choices on a real model), sparse_vdit's lists are per head and
static. Shapes:

* ``wan21-720p``: Wan 2.1 720p, 21 x 45 x 80 latent (75,600 tokens), 40 heads, no text (Wan
  attends to text by cross-attention).
* ``hunyuan-720p``: HunyuanVideo 720p as the STA paper runs it, 30 x 48 x 80 latent (115,200
  tokens) + 256 text tokens after the video, 24 heads. (The issue's 33 x 45 x 80 grid is not
  divisible by STA's (6, 8, 8) tile; this one is, so tile methods are block-exact here.)
* ``image-2048``: a 2048 x 2048 image, 128 x 128 latent (16,384 tokens) + 512 text tokens
  before it (FLUX-style joint attention), 24 heads.

Per method and variant: the pattern's density, whether it carries a token rule (then ``auto``
runs it on FlexAttention; block-exact patterns run on the Gluon/Triton kernels), the estimate
time (first call, which builds the static pattern, and a repeated call, which reuses it), the
attention time of ``sa.block_sparse_attention(..., backend="auto")`` forward and forward +
backward (estimate excluded; the layout permutation of q/k/v and the output included; ``fwd (tiled
in)`` times the same attention on inputs already in tile order, without the permutations), and
dense baselines measured in the same run: SDPA with cuDNN and with FlashAttention (forward,
and cuDNN forward + backward), dense FlexAttention, and for ``neighborhood`` FlexAttention with
the same windows as a ``mask_mod`` on the untiled (raster) order, built with
``create_block_mask`` (what a FlexAttention user would write). ``vs density x cuDNN`` is the
forward time over density times the cuDNN time (1.0 = speed exactly proportional to the
computed blocks); ``tiled in vs density x cuDNN`` the same for the tile-order time. Medians
of ``triton.testing.do_bench``. Writes ``benchmarks/results/<gpu>/spatial.json``.

``--random-blocks 0.02 0.05 0.1 0.2`` adds the kernel alone at each shape: random
bidirectional block patterns (128 x 128 blocks, ``round(density * blocks)`` kept per query
block, one list per head, no token rule, no permutation) on ``auto``, the Gluon and Triton
kernels and FlexAttention with the same blocks, beside dense non-causal SDPA (cuDNN, flash)
in the same run (:func:`sparse_attn.bench.run_kernel_case` with ``causal=False``); the JSON
holds them under ``random_blocks``. ``--no-methods`` skips the method rows.

    python benchmarks/spatial.py            # all shapes, forward and forward + backward
    python benchmarks/spatial.py --quick    # hunyuan-720p, forward only
    python benchmarks/spatial.py --shapes wan21-720p --no-backward
    python benchmarks/spatial.py --no-methods --random-blocks 0.01 0.02 0.05 0.1 0.2
"""

from __future__ import annotations

import argparse
import warnings
from math import prod
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.backends import kernel_configs, resolve_backend
from sparse_attn.bench import (
    KernelCase,
    add_waves_argument,
    backend_variant,
    device_slug,
    environment,
    format_table,
    kernel_columns,
    measure,
    run_kernel_case,
    waves_label,
    write_results,
)
from sparse_attn.compensated_pattern import CompensatedPattern, resolve_compensated_backend
from sparse_attn.layouts import Layout
from sparse_attn.methods.neighborhood import neighborhood_window
from sparse_attn.ops.grid_windows import GridWindowRule
from sparse_attn.utils import synchronized_now

SHAPES = {
    "wan21-720p": dict(grid=(21, 45, 80), heads=40, text_tokens=0, text_position="after"),
    "hunyuan-720p": dict(grid=(30, 48, 80), heads=24, text_tokens=256, text_position="after"),
    "image-2048": dict(grid=(128, 128), heads=24, text_tokens=512, text_position="before"),
}

# (method, variant label, options): the defaults, and a block-exact GNA configuration
# (stride = tile, window = three tiles, or one tile along time) that the kernels run.
VARIANTS = {
    3: [
        ("neighborhood", "defaults", {}),
        ("neighborhood", "gna-block-exact", dict(window=(2, 24, 24), stride=(2, 8, 8), tile=(2, 8, 8))),
        ("sliding_tile", "defaults", {}),
        ("radial", "defaults", {}),
        # VMoBA's blocks must divide the grid: sizes that divide both video shapes, one per partition.
        ("vmoba", "layer 0 (1D, 3 frames)", dict(layer=0, chunk_1d=3)),
        ("vmoba", "layer 1 (2D, 3x8)", dict(layer=1, chunk_2d=(3, 8))),
        ("vmoba", "layer 2 (3D, 3x3x8)", dict(layer=2, chunk_3d=(3, 3, 8))),
        ("svg", "defaults (density 0.25, patch 8x16)", {}),
        ("sparse_vdit", "defaults (multi-diagonal, width 0.125)", {}),
        ("draft", "defaults (sparsity 0.9, pool 8x16)", {}),
        ("psa", "defaults (thresholds 0.4/0.5/0.6/0.8, tile 2x8x8)", {}),
        ("sla", "defaults (5% critical, 10% skipped, zero Proj)", {}),
        ("sla", "identity Proj, 64-token blocks", dict(projection="identity", block_q=64, block_k=64)),
    ],
    2: [
        ("neighborhood", "defaults", {}),
        ("neighborhood", "gna-block-exact", dict(window=(24, 48), stride=(8, 16), tile=(8, 16))),
        ("sliding_tile", "defaults", {}),
        ("draft", "defaults (sparsity 0.9, pool 8x16)", {}),
        ("psa", "defaults (thresholds 0.4/0.5/0.6/0.8)", {}),
        ("sla", "defaults (5% critical, 10% skipped, zero Proj)", {}),
    ],
}

COLUMNS = [
    ("shape", "shape", "s"),
    ("method", "method", "s"),
    ("variant", "variant", "s"),
    ("density", "density", ".3f"),
    ("token_rule", "rule", "s"),
    ("backend", "backend", "s"),
    ("estimate_first_ms", "est. 1st ms", ".1f"),
    ("estimate_ms", "est. ms", ".2f"),
    ("fwd_ms", "fwd ms", ".2f"),
    ("fwd_tile_order_ms", "fwd (tiled in) ms", ".2f"),
    ("fwd_bwd_ms", "fwd+bwd ms", ".2f"),
    ("cudnn_ms", "cuDNN ms", ".2f"),
    ("flash_ms", "flash ms", ".2f"),
    ("flex_dense_ms", "flex dense ms", ".2f"),
    ("flex_mask_mod_ms", "flex mask_mod ms", ".2f"),
    ("cudnn_fwd_bwd_ms", "cuDNN fwd+bwd ms", ".2f"),
    ("speedup_vs_cudnn", "vs cuDNN (x faster)", ".2f"),
    ("vs_density_x_cudnn", "vs density x cuDNN", ".2f"),
    ("kernel_vs_density_x_cudnn", "tiled in vs density x cuDNN", ".2f"),
    ("speedup_vs_flex_mask_mod", "vs flex mask_mod (x faster)", ".2f"),
]


def dense_runners(q, k, v) -> dict:
    """Dense bidirectional baselines on the same tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    compiled_flex = torch.compile(flex_attention, dynamic=False)

    def sdpa(choice):
        def run():
            with sdpa_kernel(choice):
                return F.scaled_dot_product_attention(q, k, v)

        return run

    return {
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "flex_dense": lambda: compiled_flex(q, k, v),
    }


def with_backward(fn, inputs):
    """``fn`` followed by the backward pass of its output into ``inputs``."""
    grad = torch.randn_like(inputs[0])

    def run():
        torch.autograd.grad(fn(*inputs), inputs, grad)

    return run


def flex_mask_mod_runner(q, k, v, shape: dict, options: dict):
    """FlexAttention with the NATTEN windows as a ``mask_mod`` on the raster order (no tile permutation)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    layout = Layout(shape["grid"], text_tokens=shape["text_tokens"], text_position=shape["text_position"])
    config = sa.get_method("neighborhood").make_config(grid=shape["grid"], **options)
    rank = layout.rank

    def per_dim(value):
        return (value,) * rank if isinstance(value, int) else tuple(value)

    windows = tuple(
        neighborhood_window(size, w, r, s, q.device)
        for size, w, r, s in zip(
            layout.grid, per_dim(config.window), per_dim(config.dilation), per_dim(config.stride), strict=True
        )
    )
    rule = GridWindowRule(layout, windows)

    def mask_mod(b, h, q_idx, kv_idx):
        return rule.allowed(q_idx, kv_idx)

    # _compile: build the mask block by block instead of materializing S x S booleans.
    block_mask = create_block_mask(mask_mod, None, None, layout.seq_len, layout.seq_len, device=q.device, _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def measure_flex_mask_mod(q, k, v, shape: dict, options: dict, device) -> tuple[float | None, str | None]:
    """``measure`` of :func:`flex_mask_mod_runner`, its block-mask build included in what may fail
    (reported as the error line, not fatal)."""
    try:
        return measure(flex_mask_mod_runner(q, k, v, shape, options), device)
    except Exception as failure:
        return None, f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"


def run_shape(name: str, shape: dict, *, backward: bool, device: torch.device, methods=None, on_row=None) -> list[dict]:
    """Every variant of one shape (``methods``: only those); ``on_row(rows)`` after each row."""
    layout = Layout(shape["grid"], text_tokens=shape["text_tokens"])
    q, k, v = (
        torch.randn(1, shape["heads"], layout.seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    dense = {}
    for label, fn in dense_runners(q, k, v).items():
        dense[f"{label}_ms"], error = measure(fn, device)
        if error:
            print(f"  {name} {label}: {error}")
    if backward:
        inputs = tuple(x.detach().requires_grad_() for x in (q, k, v))
        cudnn = dense_runners(*inputs)["cudnn"]
        dense["cudnn_fwd_bwd_ms"], error = measure(with_backward(lambda *qkv: cudnn(), inputs), device)
        if error:
            print(f"  {name} cudnn fwd+bwd: {error}")
    rows = []
    for method, variant, options in VARIANTS[len(shape["grid"])]:
        if methods and method not in methods:
            continue
        row = run_variant(name, shape, method, variant, options, (q, k, v), backward=backward, device=device)
        row.update(dense)
        fwd, cudnn = row.get("fwd_ms"), row.get("cudnn_ms")
        if fwd and cudnn:
            row["speedup_vs_cudnn"] = cudnn / fwd
            row["vs_density_x_cudnn"] = fwd / (row["density"] * cudnn)
            kernel = row.get("fwd_tile_order_ms") or fwd  # without the permutations where there are any
            row["kernel_vs_density_x_cudnn"] = kernel / (row["density"] * cudnn)
        if fwd and row.get("flex_mask_mod_ms"):
            row["speedup_vs_flex_mask_mod"] = row["flex_mask_mod_ms"] / fwd
        rows.append(row)
        print(format_table([row], COLUMNS), flush=True)
        for line in row["errors"]:
            print("  error:", line)
        if on_row is not None:
            on_row(rows)
    return rows


def run_variant(name: str, shape: dict, method: str, variant: str, options: dict, qkv, *, backward: bool, device):
    """One method variant on one shape: estimate times, density, backend, forward (and backward) times."""
    q, k, v = qkv
    row = {"shape": name, "method": method, "variant": variant, "options": repr(options), "errors": []}
    call = dict(causal=False, grid=shape["grid"], text_tokens=shape["text_tokens"], **options)
    call["text_position"] = shape["text_position"]
    try:
        start = synchronized_now(device)
        pattern = sa.estimate(q, k, method, **call)
        row["estimate_first_ms"] = (synchronized_now(device) - start) * 1e3
    except Exception as error:  # a method that cannot take a shape is reported, not fatal
        row["errors"].append(f"estimate: {type(error).__name__}: {error}")
        return row
    row["estimate_ms"], _ = measure(lambda: sa.estimate(q, k, method, **call), device)
    row["density"] = pattern.density(causal=False)
    row["token_rule"] = "yes" if pattern.token_rule is not None else "no"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(pattern, CompensatedPattern):
            row["backend"] = resolve_compensated_backend("auto", q, k, v, pattern, return_lse=False)
        else:
            row["backend"] = resolve_backend("auto", q, k, v, pattern, causal=False, return_lse=False)

    def attend(*tensors):
        return sa.block_sparse_attention(*tensors, pattern, causal=False)

    row["fwd_ms"], error = measure(lambda: attend(q, k, v), device)
    if error:
        row["errors"].append(f"fwd: {error}")
    layout = pattern.layout
    if layout is not None and not layout.is_identity:
        # The attention alone, on inputs already in tile order (the permutations split out).
        tiled = tuple(layout.permute(x) for x in (q, k, v))
        in_order = pattern.tile_order()
        row["fwd_tile_order_ms"], error = measure(
            lambda: sa.block_sparse_attention(*tiled, in_order, causal=False), device
        )
        if error:
            row["errors"].append(f"fwd (tile order): {error}")
    if backward and isinstance(pattern, CompensatedPattern):
        row["errors"].append(
            "fwd+bwd: not measured (the compensated kernel is forward-only; gradients run on the reference)"
        )
    elif backward:
        inputs = tuple(x.detach().requires_grad_() for x in (q, k, v))
        row["fwd_bwd_ms"], error = measure(with_backward(attend, inputs), device)
        if error:
            row["errors"].append(f"fwd+bwd: {error}")
    if method == "neighborhood":
        row["flex_mask_mod_ms"], error = measure_flex_mask_mod(q, k, v, shape, options, device)
        if error:
            row["errors"].append(f"flex mask_mod: {error}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--quick", action="store_true", help="hunyuan-720p only, forward only")
    parser.add_argument("--no-backward", action="store_true", help="skip the forward + backward timings")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods' rows")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/<gpu>/spatial.json)")
    parser.add_argument(
        "--random-blocks",
        type=float,
        nargs="+",
        default=[],
        metavar="DENSITY",
        help="also time the kernels alone on random bidirectional block patterns of these densities",
    )
    parser.add_argument("--no-methods", action="store_true", help="skip the method rows (with --random-blocks)")
    add_waves_argument(parser)
    parser.add_argument(
        "--kernel-configs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="kernel_configs overrides for every call, e.g. token_gather_rows=128 (vmoba's token kernels)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/spatial.py needs a CUDA GPU")
    overrides = backend_variant("+".join(["auto", *args.kernel_configs]))[1]
    with kernel_configs(kv_streams_per_wave=args.kv_streams_per_wave, **overrides):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Every row ``args`` asks for, printed and written to JSON."""
    device = torch.device("cuda")
    shapes = args.shapes or (["hunyuan-720p"] if args.quick else list(SHAPES))
    backward = not (args.quick or args.no_backward)
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "spatial.json"
    meta = {"benchmark": "spatial", "shapes": {name: SHAPES[name] for name in shapes}, "backward": backward}
    meta["kv_streams_per_wave"] = waves_label(args.kv_streams_per_wave)
    meta["kernel_configs"] = args.kernel_configs
    rows, random_rows = [], []

    def save(extra=()):  # after every row: a run cut by a time limit keeps what it measured
        write_results(rows + list(extra), out, {**meta, **environment(device), "random_blocks": random_rows})

    for name in shapes if not args.no_methods else []:
        rows += run_shape(name, SHAPES[name], backward=backward, device=device, methods=args.methods, on_row=save)
        torch.cuda.empty_cache()  # the shape's tensors are gone: return their memory before the next one
        save()
    backends = ("auto", "gluon", "triton", "flex")
    for name in shapes if args.random_blocks else []:
        shape = SHAPES[name]
        tokens = prod(shape["grid"]) + shape["text_tokens"]
        case = KernelCase(
            seq=tokens,
            q_heads=shape["heads"],
            kv_heads=shape["heads"],
            densities=tuple(args.random_blocks),
            causal=False,
        )
        random_rows += [{"shape": name, **row} for row in run_kernel_case(case, backends, device)]
        torch.cuda.empty_cache()
        save()
    if rows:
        print()
        print(format_table(rows, COLUMNS))
    if random_rows:
        print()
        print("kernels alone, random bidirectional block patterns (no token rule, no permutation):")
        print(format_table(random_rows, kernel_columns(backends, ("sdpa-cudnn", "sdpa-flash"))))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
