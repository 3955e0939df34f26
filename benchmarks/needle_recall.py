"""Does a method keep the needle for the rows that answer? (CPU; real q/k of a model's global layers)

The recall frontier (``recall_frontier.py``) averages kept attention mass over every query; the
answer to a needle task is generated from the prompt's last rows. This script captures the
post-RoPE q/k of every global layer on one needle prompt (the eval's ``niah`` sample for the
length, depth and seed, through ``recall_frontier.capture`` and its cache), estimates each method
at its defaults (``seer`` with the gates shipped for the model), and reports per layer and head
for the last 64 query rows:

* ``needle_mass``: the exact softmax mass those rows put on the needle's tokens;
* per method: its density, the mass of those rows it keeps (``last_rows_recall``), the needle mass
  it keeps, and the share of the needle's tokens the last query block's list covers.

    python benchmarks/needle_recall.py --length 32768 --depth 0.2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import recall_frontier
import sparse_attn as sa

LAST_ROWS = 64


def needle_rows(q, k, scale: float, spans, patterns: dict) -> dict:
    """The per-head figures above for one layer's ``q`` (1, Hq, S, D) / ``k`` (1, Hkv, S, D)."""
    seq, group = q.shape[2], q.shape[1] // k.shape[1]
    rows = torch.arange(seq - LAST_ROWS, seq)
    logits = (q[:, :, -LAST_ROWS:] @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    logits = logits.masked_fill(torch.arange(seq)[None, None, None, :] > rows[None, None, :, None], float("-inf"))
    probabilities = logits.softmax(-1)[0]  # (Hq, rows, S)
    needle = torch.zeros(seq, dtype=torch.bool)
    for start, end in spans:
        needle[start:end] = True
    result = {"needle_mass": probabilities[:, :, needle].sum(-1).mean(-1).tolist()}
    for name, pattern in patterns.items():
        last_block = recall_frontier._kept_blocks(pattern.expand_heads(q.shape[1]), slice(-1, None))[:, 0]
        kept = last_block.repeat_interleave(pattern.block_k, -1)[:, :seq]  # (Hq, S): the last query block's keys
        result[name] = {
            "density": pattern.density(),
            "blocks": [pattern.block_q, pattern.block_k],
            "last_rows_recall": (probabilities * kept[:, None, :]).sum(-1).mean(-1).tolist(),
            "needle_mass_kept": (probabilities * (kept & needle)[:, None, :]).sum(-1).mean(-1).tolist(),
            "needle_tokens_kept": ((kept & needle).sum(-1) / needle.sum()).tolist(),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--depth", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=["seer", "xattention"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sparse_attn_recall_frontier"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    captured = recall_frontier.capture(
        args.model, args.length, None, args.cache, task_name="niah", depth=args.depth, seed=args.seed
    )
    gates = None
    if "seer" in args.methods:
        from sparse_attn.methods.seer import shipped_gates

        gates = shipped_gates(args.model)
    layers = {}
    for layer, (q, k) in captured["layers"].items():
        patterns = {}
        with torch.no_grad():
            for name in args.methods:
                options = {"gates": gates[layer]} if name == "seer" else {}
                patterns[name] = sa.estimate(q, k, name, **options)
        layers[layer] = needle_rows(q, k, captured["scale"][layer], captured["needle_spans"], patterns)
        print(layer, json.dumps(layers[layer]), flush=True)
    path = args.output or Path(__file__).parent / "results" / "cpu" / f"needle_recall_{args.length}_d{args.depth}.json"
    meta = {"benchmark": "needle_recall", "model": args.model, "prompt": captured["prompt"], "last_rows": LAST_ROWS}
    path.write_text(json.dumps({"meta": meta, "needle_spans": captured["needle_spans"], "layers": layers}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
