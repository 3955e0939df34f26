"""End to end: time to first token of gemma3-270m, dense SDPA against the patched model (GPU).

For each prompt length, ``gemma3-270m`` in bfloat16 runs one prefill forward (the prompt
in, the first token's logits out, KV cache filled) as

* ``sdpa``: the unpatched model (transformers' SDPA; its 15 sliding-window layers get a
  dense ``S x S`` mask);
* ``dense``: ``sa.patch(model, "dense")``: the 3 global layers on our block-sparse backend
  with every block, the sliding layers as exact windowed attention: the sliding-window
  gain alone;
* each method in ``--methods`` (default ``xattention`` and ``flexprefill`` at their
  defaults) on the global layers. A method that is not registered is skipped, and said so.

TTFT is the median of ``--repeats`` timed forwards (CUDA synchronized) after one warm-up.
One more forward under ``sa.record`` gives the per-layer density. The prompt is filler
text with a pass key in the middle and the question at the end; after the timing, 8
greedy tokens are generated and ``passkey`` says whether the key came back, a cheap check
that a configuration still reads the whole context.

Prints a table and writes ``benchmarks/results/<gpu>/e2e.json``.

    python benchmarks/e2e.py                                # 8K, 16K, 32K
    python benchmarks/e2e.py --lengths 32768 --methods xattention
    python benchmarks/e2e.py --quick                        # 640 tokens, float32, runs on CPU (no JSON unless --out)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from sparse_attn.bench import device_slug, environment, format_table, write_results
from sparse_attn.integrations import patch, record, unpatch
from sparse_attn.models import load
from sparse_attn.registry import list_methods

MODEL = "gemma3-270m"
PASS_KEY = "71432"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

COLUMNS = [
    ("length", "length", "d"),
    ("config", "config", "s"),
    ("ttft_ms", "TTFT ms", ".1f"),
    ("ttft_vs_sdpa", "vs sdpa", ".3f"),
    ("global_density", "global density", ".3f"),
    ("estimate_ms", "estimate ms", ".1f"),
    ("passkey", "passkey", "s"),
]


def passkey_prompt(tokenizer, length: int) -> torch.Tensor:
    """``(1, length)`` token ids: intro, filler, the pass key at the middle, filler, the question."""

    def ids(text: str, bos: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=bos).input_ids

    head = ids("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. ", bos=True)
    needle = ids(f"The pass key is {PASS_KEY}. Remember it. {PASS_KEY} is the pass key. ")
    question = ids("What is the pass key? The pass key is")
    filler = ids(FILLER)
    budget = length - len(head) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"length {length} is too short for the pass-key prompt")
    repeated = filler * (budget // len(filler) + 1)
    before, after = repeated[: budget // 2], repeated[: budget - budget // 2]
    return torch.tensor([head + before + needle + after + question])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_to_first_token(model, ids: torch.Tensor, repeats: int) -> float:
    """Median ms of a prefill forward that returns the last position's logits."""
    samples = []
    for attempt in range(repeats + 1):
        synchronize(ids.device)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        synchronize(ids.device)
        if attempt:  # the first run warms up kernels and autotuning
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def answers_pass_key(model, tokenizer, ids: torch.Tensor) -> bool:
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    return PASS_KEY in tokenizer.decode(generated[0, ids.shape[1] :])


def measure(model, tokenizer, ids: torch.Tensor, config: str, repeats: int, patch_options: dict) -> dict:
    """One configuration at one length: TTFT, per-layer density, pass key."""
    if config != "sdpa":
        patch(model, config, **patch_options)
    try:
        ttft = time_to_first_token(model, ids, repeats)
        layers = []
        if config != "sdpa":
            with record(model) as recorder:
                model(ids, logits_to_keep=1)
            layers = recorder.rows()
        passkey = answers_pass_key(model, tokenizer, ids)
    finally:
        if config != "sdpa":
            unpatch(model)
    global_layers = [layer for layer in layers if layer["kind"] != "window"]
    return {
        "length": ids.shape[1],
        "config": config,
        "ttft_ms": ttft,
        "global_density": statistics.mean(r["density"] for r in global_layers) if global_layers else None,
        "estimate_ms": sum(r["estimate_ms"] for r in global_layers) if global_layers else None,
        "passkey": "yes" if passkey else "no",
        "layers": [
            {k: r[k] for k in ("layer", "kind", "method", "density", "head_density", "estimate_ms")} for r in layers
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--methods", nargs="+", default=["xattention", "flexprefill"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="auto", help="block-sparse backend for the patched configs")
    parser.add_argument("--quick", action="store_true", help="640 tokens, float32, min_seq_len 256: a CPU smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>/e2e.json)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        raise SystemExit("benchmarks/e2e.py needs a CUDA GPU; on CPU run it with --quick")
    torch.set_grad_enabled(False)
    patch_options = {"backend": args.backend}
    if args.quick:
        args.lengths, args.repeats = [640], 1  # past the 512-token window, so sliding layers slide
        patch_options["min_seq_len"] = 256
        if device.type == "cpu" and args.backend == "auto":
            patch_options["backend"] = "reference"  # FlexAttention would compile for minutes on a CPU
    dtype = torch.float32 if args.quick else torch.bfloat16
    model, tokenizer = load(MODEL, dtype=dtype, device=device)

    registered = {method.name for method in list_methods()}
    configs = ["sdpa", "dense"]
    for method in args.methods:
        if method in registered:
            configs.append(method)
        else:
            print(f"skipping {method}: not a registered method (registered: {sorted(registered)})")

    rows = []
    for length in args.lengths:
        ids = passkey_prompt(tokenizer, length).to(device)
        baseline = None
        for config in configs:
            row = measure(model, tokenizer, ids, config, args.repeats, patch_options)
            baseline = baseline or row["ttft_ms"]
            row["ttft_vs_sdpa"] = row["ttft_ms"] / baseline
            rows.append(row)
            print(format_table([row], COLUMNS), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print()
    print(format_table(rows, COLUMNS))
    for row in rows:
        if row["layers"]:
            per_layer = " ".join(
                f"{layer['layer']}:{layer['density']:.2f}" for layer in row["layers"] if layer["kind"] != "window"
            )
            print(f"{row['length']:>6} {row['config']:<12} global-layer density  {per_layer}")
    out = args.out
    if out is None and device.type == "cuda" and not args.quick:
        out = Path(__file__).parent / "results" / device_slug(device) / "e2e.json"
    if out is not None:
        meta = {
            "model": MODEL,
            "dtype": str(dtype).removeprefix("torch."),
            "repeats": args.repeats,
            "patch_options": patch_options,
            **environment(device),
        }
        write_results(rows, out, meta)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
