"""Token rules inside partial blocks: box predicate (Gluon, Triton) vs bitmasks (Triton) vs FlexAttention (GPU).

Exact NATTEN neighbourhood windows (``neighborhood``, stride 1) cut every block they keep, so
the kernels evaluate a token rule inside each one. This benchmark runs the same pattern
(the method's own, in tile order, inputs already in that order: the permutation is the same for
every row and left out) through every way sparse-attn can evaluate the rule, beside dense
attention measured in the same run:

* ``gluon-predicate``: the Gluon Hopper kernel with the rule as a box predicate (what ``auto``
  runs on Hopper);
* ``triton-predicate``: the portable Triton kernel with the predicate;
* ``triton-bitmask``: the Triton kernel reading per-block bitmasks (the rule wrapped so it offers
  no predicate; the bitmasks are built once, outside the timing);
* ``flex-same-blocks``: FlexAttention on the same block lists with the rule as its ``mask_mod``
  (``backend="flex"``);
* ``flex-user``: what a FlexAttention user writes: the windows as a ``mask_mod`` on the raster
  order, ``create_block_mask`` over the whole sequence, compiled ``flex_attention``;
* dense cuDNN SDPA.

Forward, and forward + backward (the backward of every sparse-attn row reads the bitmasks).
Bidirectional, bf16, batch 1, head_dim 128, random q/k/v. Medians of ``triton.testing.do_bench``
(:func:`sparse_attn.bench.time_ms`). Writes ``benchmarks/results/<gpu>/token_rules.json``.

    python benchmarks/token_rules.py                       # Wan 2.1, HunyuanVideo, 2048^2 image
    python benchmarks/token_rules.py --shapes wan21-720p --no-backward
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, format_table, measure, write_results
from sparse_attn.masked_pattern import MaskedPattern
from sparse_attn.plan import plan_for, rule_bitmask
from spatial import SHAPES, measure_flex_mask_mod, with_backward

WINDOWS = {3: [("defaults (7, 7, 7)", {}), ("(3, 7, 7)", dict(window=(3, 7, 7)))], 2: [("defaults (7, 7)", {})]}

COLUMNS = [
    ("shape", "shape", "s"),
    ("window", "window", "s"),
    ("density", "density", ".3f"),
    ("variant", "variant", "s"),
    ("fwd_ms", "fwd ms", ".2f"),
    ("fwd_bwd_ms", "fwd+bwd ms", ".2f"),
    ("cudnn_ms", "cuDNN ms", ".2f"),
    ("vs_density_x_cudnn", "fwd / (density x cuDNN)", ".2f"),
    ("speedup_vs_flex_same_blocks", "x faster than flex (same blocks)", ".2f"),
    ("speedup_vs_flex_user", "x faster than flex (user)", ".2f"),
]


class BitmaskOnly:
    """The same token rule without ``kernel_predicate``: the kernels read it as bitmasks."""

    def __init__(self, rule) -> None:
        self.rule = rule

    def to(self, device) -> BitmaskOnly:
        return BitmaskOnly(self.rule.to(device))

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.rule.allowed(q_pos, k_pos)


def run_shape(name: str, shape: dict, *, backward: bool, bitmask: bool, device) -> list[dict]:
    length = math.prod(shape["grid"]) + shape["text_tokens"]
    q, k, v = (torch.randn(1, shape["heads"], length, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms, _ = measure(lambda: F.scaled_dot_product_attention(q, k, v), device)
    rows = []
    for window_label, options in WINDOWS[len(shape["grid"])]:
        call = dict(grid=shape["grid"], text_tokens=shape["text_tokens"], text_position=shape["text_position"])
        pattern = sa.estimate(q, k, "neighborhood", causal=False, **call, **options)
        in_order = pattern.tile_order()
        tiled = tuple(pattern.layout.permute(x) for x in (q, k, v))
        variants = {
            "gluon-predicate": (in_order, "gluon"),
            "triton-predicate": (in_order, "triton"),
            "flex-same-blocks": (in_order, "flex"),
        }
        if bitmask:
            wrapped = MaskedPattern.over_layout(
                in_order, None, token_rule=BitmaskOnly(in_order.token_rule), rule_partial=in_order.rule_partial
            )
            rule_bitmask(wrapped)  # built once, outside the timing
            assert plan_for(wrapped, causal=False).rule_lists is not None
            variants["triton-bitmask"] = (wrapped, "triton")
        density = pattern.density(causal=False)
        base = dict(shape=name, window=window_label, density=density, cudnn_ms=cudnn_ms, errors=[])
        times = {}
        for variant, (run_pattern, backend) in variants.items():
            row = dict(base, variant=variant, partial_entries=run_pattern.partial_entries(), errors=[])

            def forward(*qkv, run_pattern=run_pattern, backend=backend):
                return sa.block_sparse_attention(*qkv, run_pattern, causal=False, backend=backend)

            row["fwd_ms"], error = measure(lambda forward=forward, tiled=tiled: forward(*tiled), device)
            if error:
                row["errors"].append(f"fwd: {error}")
            if backward:
                inputs = tuple(x.detach().requires_grad_() for x in tiled)
                row["fwd_bwd_ms"], error = measure(with_backward(forward, inputs), device)
                if error:
                    row["errors"].append(f"fwd+bwd: {error}")
            times[variant] = row
            rows.append(row)
        user = dict(base, variant="flex-user", errors=[])
        user["fwd_ms"], error = measure_flex_mask_mod(q, k, v, shape, options, device)
        if error:
            user["errors"].append(f"fwd: {error}")
        rows.append(user)
        same, by_user = times["flex-same-blocks"].get("fwd_ms"), user.get("fwd_ms")
        for row in [*times.values(), user]:
            fwd = row.get("fwd_ms")
            if fwd and cudnn_ms:
                row["vs_density_x_cudnn"] = fwd / (density * cudnn_ms)
            if fwd and same:
                row["speedup_vs_flex_same_blocks"] = same / fwd
            if fwd and by_user:
                row["speedup_vs_flex_user"] = by_user / fwd
        print(format_table([r for r in rows if r["window"] == window_label], COLUMNS), flush=True)
        for row in rows:
            for line in row["errors"] if row["window"] == window_label else ():
                print(f"  {row['variant']}: {line}")
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--no-bitmask", action="store_true", help="skip the bitmask row (its tables take a while)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/token_rules.py needs a CUDA GPU")
    device = torch.device("cuda")
    shapes = args.shapes or list(SHAPES)
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "token_rules.json"
    meta = {"benchmark": "token_rules", "shapes": {name: SHAPES[name] for name in shapes}}
    rows = []
    for name in shapes:
        rows += run_shape(name, SHAPES[name], backward=not args.no_backward, bitmask=not args.no_bitmask, device=device)
        write_results(rows, out, {**meta, **environment(device)})  # after every shape: a cut run keeps its rows
    print()
    print(format_table(rows, COLUMNS))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
