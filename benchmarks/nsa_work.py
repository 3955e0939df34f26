"""NSA's forward work counted: what each step would take at cuDNN's dense rate, beside what it took.

For the NSA module at the paper's defaults (compression blocks of l = 32 every d = 16 tokens,
selection blocks of l' = 64, top n = 16, window w = 512; ``sparse_attn.nn.NativeSparseAttention``)
this counts, token by token, the (query, key) pairs each branch multiplies per query head:

* compressed: the compressed tokens whose block lies at or before the token (``t`` sees
  ``(t - l + 1) // d + 1`` of them from ``t = l - 1``);
* selection scores: the same pairs again, products ``q k^T`` only (half of an attention's);
* selected: ``min(n, own + 1)`` blocks of ``l'`` keys, the own block causal;
* window: ``min(w, t + 1)`` keys;
* dense causal: ``t + 1`` keys.

The attention-shaped steps are priced at cuDNN's own dense rate from a ``benchmarks/token_sparse.py``
result (its ``cudnn_fwd_ms`` over the dense causal products of the same shape), and the steps that
move bytes rather than multiply at the GPU's memory bandwidth (``--bandwidth``, TB/s): the gated sum
(three branch outputs read, one written, 16-bit), the top-n ranking (the float32 scores read in the
module's chunks, the int32 lists written) and the compression (keys and values read once). The sum
is what the forward would take with every step at those rates and nothing else; cuDNN's time over
it bounds the forward's speed-up at that rate. Beside it the result's measured parts (``--parts``
runs). CPU only, no kernels run:

    python benchmarks/nsa_work.py --results benchmarks/results/h100/nsa_module_c0.98_folded_s64.json --bandwidth 3.35
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparse_attn.bench import format_table, write_results
from sparse_attn.ops._chunking import CHUNK_ELEMENTS

L, D_STRIDE, L_SELECT, TOP_N, WINDOW = 32, 16, 64, 16, 512


def pair_counts(seq: int, top_n: int = TOP_N) -> dict[str, int]:
    """Pairs per query head each branch multiplies at ``seq`` tokens (queries = keys = ``seq``),
    ``top_n`` selected blocks per token."""
    counts = dict(compressed=0, selected=0, window=0, dense=0)
    for t in range(seq):
        counts["compressed"] += (t - L + 1) // D_STRIDE + 1 if t >= L - 1 else 0
        counts["selected"] += (min(top_n, t // L_SELECT + 1) - 1) * L_SELECT + t % L_SELECT + 1
        counts["window"] += min(WINDOW, t + 1)
        counts["dense"] += t + 1
    return counts


def ranking_bytes(seq: int, kv_heads: int) -> int:
    """Bytes the top-n ranking reads (float32 scores, in the module's chunks of rows, each as wide
    as its last row's blocks) and writes (int32 lists and counts)."""
    n_blocks = -(-seq // L_SELECT)
    rows = max(1, CHUNK_ELEMENTS // (kv_heads * n_blocks))
    total = 0
    for start in range(0, seq, rows):
        stop = min(seq, start + rows)
        width = min(n_blocks, max(TOP_N, (stop - 1) // L_SELECT + 1))
        total += (stop - start) * kv_heads * width * 4
    return total + seq * kv_heads * (TOP_N + 1) * 4


def work_rows(row: dict, bandwidth_tbs: float) -> list[dict]:
    """The table's rows for one ``nsa-module`` result ``row``."""
    seq, q_heads, kv_heads, dim = row["seq"], row["q_heads"], row["kv_heads"], row["head_dim"]
    pairs = pair_counts(seq)
    attention = 4 * dim * q_heads  # products per pair: q k^T and p v, two flops each
    rate = pairs["dense"] * attention / (row["cudnn_fwd_ms"] * 1e-3)  # flop/s
    element = 2  # 16-bit activations
    tokens = seq * q_heads * dim * element
    moved = bandwidth_tbs * 1e12  # byte/s
    # (step, pairs per head shown, products, seconds of bytes at the bandwidth)
    steps = [
        ("compress", None, 0, seq * kv_heads * dim * element * 2 / moved),
        ("compressed_branch", pairs["compressed"], pairs["compressed"] * attention, 0.0),
        ("selection", None, pairs["compressed"] * attention / 2, ranking_bytes(seq, kv_heads) / moved),
        ("selected_branch", pairs["selected"], pairs["selected"] * attention, 0.0),
        ("window_branch", pairs["window"], pairs["window"] * attention, 0.0),
        ("gated_sum", None, 0, 4 * tokens / moved),
    ]
    measured = row.get("parts_fwd_ms") or {}
    rows = []
    for name, shown_pairs, flops, seconds in steps:
        ideal = flops / rate + seconds
        took = measured.get(name)
        rows.append(
            dict(
                step=name,
                pairs_per_head=shown_pairs,
                tflop=flops / 1e12 if flops else None,
                ideal_ms=ideal * 1e3,
                measured_ms=took,
                measured_over_ideal=took / (ideal * 1e3) if took else None,
            )
        )
    ideal_total = sum(r["ideal_ms"] for r in rows)
    rows.append(
        dict(
            step="forward",
            pairs_per_head=None,
            tflop=sum(r["tflop"] or 0.0 for r in rows),
            ideal_ms=ideal_total,
            measured_ms=row.get("ours_fwd_ms"),
            measured_over_ideal=row["ours_fwd_ms"] / ideal_total if row.get("ours_fwd_ms") else None,
        )
    )
    for r in rows:
        r.update(seq=seq, cudnn_fwd_ms=row["cudnn_fwd_ms"], cudnn_tflops=rate / 1e12)
    rows[-1]["ideal_speedup_vs_cudnn"] = row["cudnn_fwd_ms"] / ideal_total
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, nargs="+", required=True, help="benchmarks/token_sparse.py JSON")
    parser.add_argument("--bandwidth", type=float, default=3.35, help="memory bandwidth in TB/s (H100 SXM 3.35)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for path in args.results:
        for row in json.loads(path.read_text())["rows"]:
            if row.get("case") == "nsa-module" and row.get("cudnn_fwd_ms"):
                rows += [dict(r, source=path.name) for r in work_rows(row, args.bandwidth)]
    if not rows:
        raise SystemExit("no nsa-module row with a cuDNN forward time in --results")
    columns = [
        ("source", "source", "s"), ("seq", "seq", "d"), ("step", "step", "s"), ("pairs_per_head", "pairs/head", ".4g"),
        ("tflop", "TFLOP", ".3f"), ("ideal_ms", "ideal ms", ".2f"), ("measured_ms", "measured ms", ".2f"),
        ("measured_over_ideal", "measured/ideal", ".2f"),
    ]  # fmt: skip
    print(format_table(rows, columns))
    for r in rows:
        if "ideal_speedup_vs_cudnn" in r:
            print(
                f"{r['source']} {r['seq']}: cuDNN {r['cudnn_fwd_ms']:.2f} ms ({r['cudnn_tflops']:.0f} TFLOP/s); every step"
                f" at that rate and {args.bandwidth} TB/s: {r['ideal_ms']:.2f} ms, {r['ideal_speedup_vs_cudnn']:.2f}x cuDNN"
            )
    meta = dict(benchmark="nsa_work", bandwidth_tbs=args.bandwidth, results=[str(p) for p in args.results])
    write_results(rows, args.output or Path("benchmarks/results/cpu/nsa_work.json"), meta)


if __name__ == "__main__":
    main()
