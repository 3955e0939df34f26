"""Launch order of the forward kernels: waves of (batch, KV head) streams x persistent or not (GPU).

The Gluon and Triton forward kernels issue their work in waves of (batch, KV head) streams whose
K/V fit in half the L2 (:func:`sparse_attn.backends.launch.heads_per_wave`); the Gluon kernel is
persistent (one program per SM) for light work items of similar rows. This script times
``backend="auto"`` on one pattern under every combination of ``kv_streams_per_wave`` (automatic,
``0`` = one wave of every stream, the order before waves) and ``gluon_persistent`` (automatic,
off, on), and with waves but without the lead of heavy query blocks (``heavy_rows_first=False``,
:func:`sparse_attn.backends.launch.lead_blocks`), beside cuDNN dense SDPA in the same run, so the dispatch rules
(:data:`sparse_attn.backends.gluon.PERSISTENT_MAX_WORK_BUCKET`,
:data:`~sparse_attn.backends.gluon.PERSISTENT_MAX_ROW_IMBALANCE`) can be checked against
measurements; ``--backward`` times forward + backward instead (the backward's dQ and dK/dV
passes take the same waves and lead). Cases:

* ``causal``: random causal block patterns, batch 1, 32/8 heads, head_dim 128, bf16 (the grid of
  ``benchmarks/kernel_grid.py``), at ``--lengths`` x ``--densities``;
* ``bidirectional``: random non-causal patterns at the video shapes of ``benchmarks/spatial.py``;
* ``spatial``: the patterns of ``neighborhood`` (defaults; GNA block-exact), ``sliding_tile``
  and ``radial`` at ``--spatial-shapes`` (default HunyuanVideo), inputs already in tile order
  (permutation excluded).

Choices ``waves_no_rule_skip`` and ``waves_rule_steps_64`` change how the Gluon forward walks a
box-predicate rule (``kernel_configs(rule_skip_steps=False)``, ``gluon_rule_block_n=64``); other
patterns run as under ``waves``.

Medians of ``triton.testing.do_bench``. Writes ``benchmarks/results/<gpu>/launch_order.json``.

    python benchmarks/launch_order.py
    python benchmarks/launch_order.py --cases spatial
    python benchmarks/launch_order.py --cases spatial --choices waves waves_no_lead one_wave
    python benchmarks/launch_order.py --cases spatial --backward --choices waves waves_no_lead
    python benchmarks/launch_order.py --cases spatial --spatial-shapes hunyuan-720p wan21-720p \
        --choices waves waves_no_rule_skip waves_rule_steps_64
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from math import prod
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.backends import kernel_configs, resolve_backend
from sparse_attn.bench import dense_baselines, device_slug, environment, format_table, measure, write_results
from sparse_attn.layouts import Layout
from sparse_attn.plan import plan_for, unseen_steps

sys.path.insert(0, str(Path(__file__).parent))
from spatial import SHAPES, VARIANTS, with_backward  # noqa: E402  (the spatial benchmark's shapes and settings)

# (label, kernel_configs overrides): a missing key keeps the built-in rule.
CHOICES = (
    ("waves", {}),
    ("waves_one_item", {"gluon_persistent": False}),
    ("waves_persistent", {"gluon_persistent": True}),
    ("waves_no_lead", {"heavy_rows_first": False}),
    ("one_wave", {"kv_streams_per_wave": 0}),
    ("one_wave_one_item", {"kv_streams_per_wave": 0, "gluon_persistent": False}),
    ("one_wave_persistent", {"kv_streams_per_wave": 0, "gluon_persistent": True}),
    # Box-predicate rules (the spatial case's neighbourhood windows): the Gluon forward's
    # warpgroups skipping the steps their rows may not see (the default) or not, and in 64-key steps.
    ("waves_no_rule_skip", {"rule_skip_steps": False}),
    ("waves_rule_steps_64", {"gluon_rule_block_n": 64}),
)
SPATIAL_METHODS = ("neighborhood", "sliding_tile", "radial")

COLUMNS = [
    ("case", "case", ""),
    ("seq", "seq", "d"),
    ("density", "density", ".3f"),
    ("row_imbalance", "max/mean row", ".1f"),
    ("unseen_steps", "unseen steps", ".3f"),
    *[(f"{label}_ms", f"{label} ms", ".2f") for label, _ in CHOICES],
    ("sdpa-cudnn_ms", "cuDNN dense ms", ".2f"),
    ("waves_vs_density_x_cudnn", "waves / (density x cuDNN)", ".2f"),
]


def time_choices(q, k, v, pattern, *, causal: bool, device: torch.device, choices=None, backward=False) -> dict:
    """Each launch choice's (``choices``: labels of :data:`CHOICES`, default all) forward time
    (``backward``: forward + backward) on one pattern, and which backend ``auto`` took."""
    row = {"backend": resolve_backend("auto", q, k, v, pattern, causal=causal, return_lse=False), "errors": []}
    plan = plan_for(pattern, causal=causal)
    row["density"], row["row_imbalance"], row["work_bucket"] = plan.density, plan.row_imbalance, plan.work_bucket
    row["heavy_blocks"] = plan.heavy_blocks
    unseen, taken = unseen_steps(plan)
    row["unseen_steps"] = unseen / taken if taken else None  # of the Gluon warpgroups' 128-key steps

    def attend(q, k, v):
        return sa.block_sparse_attention(q, k, v, pattern, causal=causal)

    if backward:
        timed = with_backward(attend, tuple(x.detach().requires_grad_() for x in (q, k, v)))
    else:
        timed = partial(attend, q, k, v)
    for label, overrides in CHOICES:
        if choices is not None and label not in choices:
            continue
        with kernel_configs(**overrides):
            row[f"{label}_ms"], error = measure(timed, device)
        if error:
            row["errors"].append(f"{label}: {error}")
    return row


def cudnn_ms(q, k, v, *, causal: bool, device: torch.device, backward=False) -> tuple[float | None, str | None]:
    """cuDNN dense SDPA's time on these inputs (once per input set: it does not depend on the
    pattern); ``backward``: forward + backward."""
    if not backward:
        return measure(dense_baselines(q, k, v, device, causal=causal)["sdpa-cudnn"], device)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # K and V expanded to the query heads (outside the timing) as leaves of their own.
    group = q.shape[1] // k.shape[1]
    inputs = (q.detach().requires_grad_(), *(x.repeat_interleave(group, 1).detach().requires_grad_() for x in (k, v)))

    def dense(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return measure(with_backward(dense, inputs), device)


def with_dense(row: dict, dense: tuple[float | None, str | None]) -> dict:
    """``row`` with cuDNN dense SDPA's time (``dense``: :func:`cudnn_ms`) and the waves' ratio to density x cuDNN."""
    row["sdpa-cudnn_ms"], error = dense
    if error:
        row["errors"].append(f"sdpa-cudnn: {error}")
    if row.get("waves_ms") and row.get("sdpa-cudnn_ms"):
        row["waves_vs_density_x_cudnn"] = row["waves_ms"] / (row["density"] * row["sdpa-cudnn_ms"])
    return row


def random_rows(
    seq, q_heads, kv_heads, densities, *, causal: bool, device, label: str, choices=None, backward=False
) -> list[dict]:
    q = torch.randn(1, q_heads, seq, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, seq, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    dense = cudnn_ms(q, k, v, causal=causal, device=device, backward=backward)
    rows = []
    for density in densities:
        pattern = sa.random_pattern(
            batch=1, heads=kv_heads, seq_q=seq, seq_k=seq, density=density, seed=0, causal=causal, device=device
        )
        timed = time_choices(q, k, v, pattern, causal=causal, device=device, choices=choices, backward=backward)
        row = {"case": f"{label} {density}", "seq": seq, **timed}
        rows.append(with_dense(row, dense))
        print(format_table(rows[-1:], COLUMNS), flush=True)
    return rows


def spatial_rows(device, choices=None, backward=False, shape_name="hunyuan-720p") -> list[dict]:
    shape = SHAPES[shape_name]
    label = shape_name.split("-")[0]
    layout = Layout(shape["grid"], text_tokens=shape["text_tokens"])
    q, k, v = (
        torch.randn(1, shape["heads"], layout.seq_len, 128, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    # The permutation does not change dense time.
    dense = cudnn_ms(q, k, v, causal=False, device=device, backward=backward)
    rows = []
    for method, variant, options in VARIANTS[3]:
        if method not in SPATIAL_METHODS:
            continue
        call = dict(causal=False, grid=shape["grid"], text_tokens=shape["text_tokens"], **options)
        pattern = sa.estimate(q, k, method, text_position=shape["text_position"], **call)
        tiled = tuple(pattern.layout.permute(x) for x in (q, k, v)) if pattern.layout is not None else (q, k, v)
        in_order = pattern.tile_order() if pattern.layout is not None else pattern
        row = {"case": f"{label} {method} {variant}", "seq": layout.seq_len}
        row.update(time_choices(*tiled, in_order, causal=False, device=device, choices=choices, backward=backward))
        rows.append(with_dense(row, dense))
        print(format_table(rows[-1:], COLUMNS), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=("causal", "bidirectional", "spatial"), default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072], help="causal case lengths")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument(
        "--choices", nargs="+", choices=[label for label, _ in CHOICES], default=None, help="default: all"
    )
    parser.add_argument(
        "--spatial-shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=["hunyuan-720p"],
        help="the spatial case's shapes",
    )
    parser.add_argument("--backward", action="store_true", help="time forward + backward (dense: cuDNN's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/launch_order.py needs a CUDA GPU")
    device = torch.device("cuda")
    cases = args.cases or ("causal", "bidirectional", "spatial")
    rows = []
    if "causal" in cases:
        for seq in args.lengths:
            rows += random_rows(
                seq,
                32,
                8,
                args.densities,
                causal=True,
                device=device,
                label="causal",
                choices=args.choices,
                backward=args.backward,
            )
            torch.cuda.empty_cache()
    if "bidirectional" in cases:
        for name in ("wan21-720p", "hunyuan-720p"):
            shape = SHAPES[name]
            seq = prod(shape["grid"]) + shape["text_tokens"]
            rows += random_rows(
                seq,
                shape["heads"],
                shape["heads"],
                args.densities,
                causal=False,
                device=device,
                label=name,
                choices=args.choices,
                backward=args.backward,
            )
            torch.cuda.empty_cache()
    if "spatial" in cases:
        for name in args.spatial_shapes:
            rows += spatial_rows(device, args.choices, args.backward, name)
            torch.cuda.empty_cache()
    print()
    print(format_table(rows, COLUMNS))
    for row in rows:
        for error in row["errors"]:
            print(f"  {row['case']}: {error}")
    out = args.out or Path(__file__).parent / "results" / device_slug(device) / "launch_order.json"
    meta = {"benchmark": "launch_order", "timed": "forward + backward" if args.backward else "forward"}
    write_results(rows, out, {**meta, **environment(device)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
