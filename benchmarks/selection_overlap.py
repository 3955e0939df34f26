"""How many selected blocks neighbouring query tokens share in token-level selections: NSA on a
real model reading real text and on the synthetic inputs of ``benchmarks/token_sparse.py``
(white noise, or q and k correlated along the sequence with ``--correlations``), and VMoBA on
video-shaped inputs correlated along the grid (``--grid-correlations``).

The token kernel packs a KV group's query heads (x a few tokens) into the rows of one tile and
loads each selected block once per tile. With ``R`` tokens per tile it walks the *union* of their
lists. ``U(R)``, printed per tile width ``R``, is the size of that union over the size of one
token's list (``select_top_n`` once a token has that many blocks before it), over tiles of ``R`` consecutive query tokens, KV heads and
layers, counted from token ``--skip`` on (before it a token has few blocks to choose from). A
tile of ``R`` tokens then loads ``U(R) / R`` of the key/value blocks per token that one-token
tiles load, and computes ``U(R)`` times one token's pairs. ``U(R) = R`` when neighbours choose
independently among many blocks; ``U(R) = 1`` when they choose alike.

* ``smollm2-135m`` rows: SmolLM2-135M-Instruct (the embedded model) with
  :func:`sparse_attn.nn.nsa_models.swap_in_nsa` in every layer (its default dense start:
  mean-pooling compressors, so the selection comes from the model's own queries and keys),
  reading the last ``--seq`` tokens of each of ``--texts`` (the haystack texts of
  :mod:`sparse_attn.eval.haystack`); one row per text with the mean over layers and the
  smallest / largest layer mean.
* ``synthetic`` rows: :class:`sparse_attn.nn.NativeSparseAttention` at the paper's defaults and
  64 query / 4 KV heads of 128 (``token_sparse.py``'s ``nsa-module``; its MLP compressors
  initialised under ``torch.manual_seed(--seed)``), on q and k from
  :func:`sparse_attn.bench.smooth_sequence` at each of ``--correlations`` and ``--lengths``.
* ``vmoba-1d`` / ``vmoba-2d`` rows: the ``vmoba`` method's estimate (its defaults; the 1D and 2D
  layers with ``benchmarks/vmoba_kernel.py``'s blocks: 3 frames, 3 x 8 patches through all
  frames) on ``--vmoba-heads`` heads of 128 at ``--vmoba-grid`` (default HunyuanVideo's
  30 x 48 x 80 latent, no text), q and k from :func:`sparse_attn.bench.smooth_grid` at each of
  ``--grid-correlations`` (correlation ``c`` between tokens one step apart along any grid
  dimension; no real video model is available here to say which ``c`` is realistic). Tiles
  are ``R`` consecutive rows of the pattern, which is in the method's tile order (each block's
  tokens contiguous), every token counted (``--skip`` does not apply: the attention is
  bidirectional). ``mean_list``: a token's mean number of blocks.

CPU in float32 (the reference backend), or CUDA. Writes
``benchmarks/results/<device>/selection_overlap.json``.

    python benchmarks/selection_overlap.py --device cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import sparse_attn as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_attn.bench import (  # noqa: E402
    device_slug,
    environment,
    format_table,
    smooth_grid,
    smooth_sequence,
    write_results,
)
from sparse_attn.nn import NativeSparseAttention  # noqa: E402
from sparse_attn.nn import nsa as nsa_module  # noqa: E402
from sparse_attn.nn.nsa_models import swap_in_nsa  # noqa: E402
from train_smollm2 import MODEL, load_model, token_sequences  # noqa: E402

WIDTHS = (2, 4, 8, 16, 64)
PAPER_SHAPE = dict(head_dim=128, num_q_heads=64, num_kv_heads=4)


def union_ratios(pattern, *, skip: int, widths=WIDTHS) -> dict[int, float]:
    """``{R: U(R)}`` for a token pattern (``block_q`` 1): over whole tiles of ``R`` tokens from
    token ``skip`` on, the sum of the tiles' union sizes over the sum of their tokens' mean list
    lengths (so a tile of tokens that list the same blocks counts 1 whatever their number)."""
    counts, indices = pattern.kv_counts.long(), pattern.kv_indices.long()
    batch, heads, seq, top_n = indices.shape
    if seq - skip < max(widths):
        raise ValueError(f"{seq} tokens leave fewer than {max(widths)} after skip={skip}")
    blocks = int(indices.max()) + 2  # one more column: where unlisted entries go
    listed = torch.arange(top_n, device=indices.device) < counts[..., None]
    indices = torch.where(listed, indices, blocks - 1)
    ratios = {}
    for width in widths:
        tiles = (seq - skip) // width
        cut = slice(skip, skip + tiles * width)
        lists = indices[:, :, cut].reshape(batch * heads, tiles, width * top_n)
        in_tile = torch.zeros(batch * heads, tiles, blocks, dtype=torch.bool, device=lists.device)
        in_tile.scatter_(2, lists, True)
        union = in_tile[..., :-1].sum().item()
        ratios[width] = union / (counts[:, :, cut].double().sum().item() / width)
    return ratios


class SelectionRecorder:
    """While active, keeps the selected branch's pattern of every NativeSparseAttention call."""

    def __init__(self):
        self.patterns = []
        self._original = None

    def __enter__(self):
        original = self._original = nsa_module.NativeSparseAttention.selection
        recorder = self

        def selection(module, *args, **kwargs):
            pattern = original(module, *args, **kwargs)
            recorder.patterns.append(pattern)
            return pattern

        nsa_module.NativeSparseAttention.selection = selection
        return self

    def __exit__(self, *exc):
        nsa_module.NativeSparseAttention.selection = self._original


def real_rows(args, device) -> list[dict]:
    model = load_model(device, args.layers)
    _, tokenizer = sa.models.load(MODEL)  # (a second load: load_model keeps only the model)
    swap_in_nsa(model, backend="reference" if device.type == "cpu" else "auto")
    rows = []
    for text in args.texts:
        ids = token_sequences(tokenizer, args.seq, [text])[-1:].to(device)
        start = time.perf_counter()
        with SelectionRecorder() as recorder, torch.no_grad():
            model(ids)
        per_layer = [union_ratios(pattern, skip=args.skip) for pattern in recorder.patterns]
        rows.append(
            _flat(
                {
                    "source": f"{MODEL}/{text}",
                    "seq": args.seq,
                    "correlation": None,
                    "layers": len(per_layer),
                    "union": {w: sum(r[w] for r in per_layer) / len(per_layer) for w in WIDTHS},
                    "union_min_layer": {w: min(r[w] for r in per_layer) for w in WIDTHS},
                    "union_max_layer": {w: max(r[w] for r in per_layer) for w in WIDTHS},
                    "union_per_layer": per_layer,
                    "seconds": time.perf_counter() - start,
                }
            )
        )
        print(format_table(rows[-1:], _columns()).splitlines()[-1], flush=True)
    return rows


def synthetic_rows(args, device) -> list[dict]:
    torch.manual_seed(args.seed)
    module = NativeSparseAttention(**PAPER_SHAPE, backend="reference" if device.type == "cpu" else "auto")
    module = module.to(device)
    rows = []
    for seq in args.lengths:
        for correlation in args.correlations:
            generator = torch.Generator(device=device).manual_seed(args.seed)
            shape = dict(generator=generator, device=device)
            q = smooth_sequence((1, PAPER_SHAPE["num_q_heads"], seq, 128), correlation, **shape)
            k = smooth_sequence((1, PAPER_SHAPE["num_kv_heads"], seq, 128), correlation, **shape)
            v = torch.randn(k.shape, **shape)
            start = time.perf_counter()
            pattern = module.selected_pattern(q, k, v)
            union = union_ratios(pattern, skip=args.skip)
            row = {"source": "synthetic", "seq": seq, "correlation": correlation, "union": union}
            row["seconds"] = time.perf_counter() - start
            rows.append(_flat(row))
            print(format_table(rows[-1:], _columns()).splitlines()[-1], flush=True)
    return rows


VMOBA_LAYERS = {"vmoba-1d": dict(layer=0, chunk_1d=3), "vmoba-2d": dict(layer=1, chunk_2d=(3, 8))}


def vmoba_rows(args, device) -> list[dict]:
    grid = tuple(int(size) for size in args.vmoba_grid.split("x"))
    rows = []
    for correlation in args.grid_correlations:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        q, k = (smooth_grid((1, args.vmoba_heads), grid, 128, correlation, generator=generator, device=device)
                for _ in range(2))  # fmt: skip
        for name, options in VMOBA_LAYERS.items():
            start = time.perf_counter()
            pattern = sa.estimate(q, k, "vmoba", causal=False, grid=grid, **options)
            row = {"source": name, "seq": q.shape[2], "correlation": correlation, "grid": grid}
            row["union"] = union_ratios(pattern, skip=0)
            row["mean_list"] = pattern.kv_counts.double().mean().item()
            row["blocks"] = pattern.num_kv_blocks
            row["seconds"] = time.perf_counter() - start
            rows.append(_flat(row))
            print(format_table(rows[-1:], _columns()).splitlines()[-1], flush=True)
    return rows


def _flat(row: dict) -> dict:
    """The row with a flat ``union_R`` copy of each ratio (the table's columns)."""
    row.update({f"union_{w}": row["union"][w] for w in WIDTHS})
    return row


def _columns() -> list[tuple[str, str, str]]:
    columns = [("source", "source", ""), ("seq", "seq", ""), ("correlation", "correlation", "")]
    columns += [(f"union_{w}", f"U({w})", ".3f") for w in WIDTHS]
    return columns + [("mean_list", "mean list", ".2f")]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="tokens of real text (SmolLM2's context: 8192)")
    parser.add_argument("--texts", nargs="+", default=["kjv", "essays", "pydoc"], help="haystack sources")
    parser.add_argument("--layers", type=int, help="keep the first N layers only (CPU smoke tests)")
    parser.add_argument("--no-model", action="store_true", help="no SmolLM2 rows")
    parser.add_argument("--lengths", type=int, nargs="*", default=[8192], help="synthetic rows' lengths")
    parser.add_argument("--correlations", type=float, nargs="*", default=[0.0, 0.9, 0.95, 0.97, 0.98, 0.99])
    parser.add_argument("--vmoba-grid", default="30x48x80", help="T x H x W of the VMoBA rows")
    parser.add_argument("--vmoba-heads", type=int, default=4)
    parser.add_argument("--grid-correlations", type=float, nargs="*", default=[0.0, 0.5, 0.8, 0.9, 0.95])
    parser.add_argument("--skip", type=int, default=2048, help="tokens before the first counted tile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(format_table([], _columns()), flush=True)
    rows = [] if args.no_model else real_rows(args, device)
    rows += synthetic_rows(args, device)
    rows += vmoba_rows(args, device)
    meta = {
        "benchmark": "selection_overlap",
        "skip": args.skip,
        "widths": WIDTHS,
        "seed": args.seed,
        **environment(device),
    }
    path = args.output or Path(__file__).parent / "results" / device_slug(device) / "selection_overlap.json"
    write_results(rows, path, meta)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
