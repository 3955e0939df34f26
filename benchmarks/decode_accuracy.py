"""Accuracy of the decode methods on a real model: generated answers and agreement with dense decode.

Prefill is dense (exact); the decode steps run each decode method over the paged cache
(:class:`sparse_attn.integrations.decode.SparseDecodeCache`) at each token budget, and the greedy
answer is scored by the eval task. Per (task, depth) the dense-decode answer is the reference:
``agreement`` is the fraction of the dense answer's tokens that the method reproduced before the
first difference. Accuracy does not depend on the device, so this runs on the CPU too (slowly).
Writes ``benchmarks/results/<device>/decode_accuracy.json``.

    python benchmarks/decode_accuracy.py --model gemma3-270m --length 4096 --budgets 512 1024
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, format_table, write_results
from sparse_attn.eval.tasks import get_task
from sparse_attn.integrations.cache import cache_keyword
from sparse_attn.integrations.decode import SparseDecodeCache


def greedy_answer(model, input_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int], *, calibrate: bool):
    """Greedy tokens after a prefill into a fresh paged cache (calibrated first for Double Sparsity)."""
    cache = SparseDecodeCache(model)
    if calibrate:
        cache.calibrate(input_ids)
    keyword = {cache_keyword(model): cache}
    output = model(input_ids, use_cache=True, logits_to_keep=1, **keyword)
    tokens = []
    token = output.logits[:, -1:].argmax(-1)
    while True:
        tokens.append(int(token))
        if tokens[-1] in stop_ids or len(tokens) >= max_new_tokens:
            return tokens
        token = model(token, use_cache=True, logits_to_keep=1, **keyword).logits[:, -1:].argmax(-1)


def agreement(tokens: list[int], reference: list[int]) -> float:
    same = 0
    for mine, theirs in zip(tokens, reference, strict=False):
        if mine != theirs:
            break
        same += 1
    return same / max(len(reference), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tasks", nargs="+", default=["passkey", "niah_multikey", "variable_tracking"])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.3, 0.7])
    parser.add_argument("--methods", nargs="+", default=["quest", "streaming", "double_sparsity", "tidaldecode"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = sa.models.load(args.model, dtype=dtype, device=device)
    stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    variants = [("dense", None)] + [(method, budget) for method in args.methods for budget in args.budgets]
    rows = []
    with torch.inference_mode():
        for task_name in args.tasks:
            task = get_task(task_name)
            for depth in args.depths:
                sample = task.make(tokenizer, args.length, depth, seed=0)
                input_ids = torch.tensor([sample.input_ids], device=device)
                reference = None
                for method, budget in variants:
                    options = {} if budget is None else {"token_budget": budget}
                    sa.patch(model, "dense", min_seq_len=1, decode_method=method, decode_options=options)
                    start = time.perf_counter()
                    try:
                        tokens = greedy_answer(
                            model, input_ids, sample.max_new_tokens, stop_ids, calibrate=method == "double_sparsity"
                        )
                    finally:
                        sa.unpatch(model)
                    reference = tokens if reference is None else reference
                    output = tokenizer.decode(tokens, skip_special_tokens=True)
                    row = {
                        "task": task_name,
                        "depth": depth,
                        "length": args.length,
                        "method": method,
                        "budget": budget,
                        "score": task.score(sample, output),
                        "agreement": agreement(tokens, reference),
                        "output": output,
                        "answers": list(sample.answers),
                        "seconds": time.perf_counter() - start,
                    }
                    rows.append(row)
                    print(f"{task_name} {depth} {method} {budget}: score {row['score']:.2f}, agreement "
                          f"{row['agreement']:.2f}, {output!r}", flush=True)  # fmt: skip
    summary = []
    for method, budget in variants:
        mine = [row for row in rows if row["method"] == method and row["budget"] == budget]
        summary.append(
            {
                "method": method,
                "budget": budget if budget is not None else "-",
                "score": sum(row["score"] for row in mine) / len(mine),
                "agreement": sum(row["agreement"] for row in mine) / len(mine),
                "cases": len(mine),
            }
        )
    columns = [("method", "method", ""), ("budget", "budget", ""), ("score", "mean score", ".2f")]
    columns += [("agreement", "agreement with dense", ".2f"), ("cases", "cases", "d")]
    print(format_table(summary, columns))
    out = args.output or Path(__file__).parent / "results" / device_slug(device) / "decode_accuracy.json"
    meta = {"benchmark": "decode_accuracy", "model": args.model, "length": args.length, **environment(device)}
    write_results(rows, out, {**meta, "summary": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
