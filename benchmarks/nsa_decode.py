"""NSA decode steps (GPU): NativeSparseAttention's one-query path against dense SDPA decode.

Two parts, medians of ``triton.testing.do_bench`` (through ``benchmarks/decode.py``'s helpers):

1. The module alone, at the NSA paper's shape (64 query / 4 KV heads, head_dim 128, bf16,
   paper defaults: l = 32, d = 16, l' = 64, n = 16, w = 512, MLP compressor with random
   weights) per context length and batch: ``decode_step`` on the held compressed tokens
   (``step_ms``, eager; ``step_graph_ms``, replayed from a CUDA graph: the GPU cost without
   launch overhead; ``step_kernel_us``, the profiler's kernel time) through the fused Triton
   kernels (``ops.nsa_decode``), and the same step through the dense PyTorch operations of the
   reference path (``step-dense``, what ran before the kernels; ``max_abs_diff`` between the
   two outputs), the compression of the one
   block a new key completes once in ``d`` steps (``compress_ms``), against dense decode with
   cuDNN and FlashAttention SDPA (the group's 16 heads as query rows of their KV head, so K/V
   are not expanded) and cuDNN replayed from a graph.
2. A whole model's greedy decode step (``--model``): SmolLM2-135M's shape (30 layers, 9 / 3
   heads of 64) with **random weights** (speed does not depend on them), bf16, prefill of
   ``--model-length`` tokens, then ``--steps`` steps through the model's ``DynamicCache``, twice
   per attention (the first generation pays first-use costs; its median is kept apart): median
   step ms of the second with SDPA, with NSA (``swap_in_nsa``, paper defaults) on the fused
   kernels and with NSA on the dense reference path (``nsa-dense``).

Writes ``benchmarks/results/<gpu>/nsa_decode.json``.

    python benchmarks/nsa_decode.py
    python benchmarks/nsa_decode.py --lengths 8192 65536 --batches 1 --no-model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import _sdpa, kernel_us, measure  # noqa: E402
from sparse_attn.bench import device_slug, environment, write_results  # noqa: E402
from sparse_attn.nn.nsa import NativeSparseAttention  # noqa: E402
from sparse_attn.ops import nsa_decode  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 64, 4, 128
SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    num_hidden_layers=30, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)  # fmt: skip


def module_row(length: int, batch: int, device, *, graphs: bool) -> dict:
    from torch.nn.attention import SDPBackend

    torch.manual_seed(0)
    module = NativeSparseAttention(HEAD_DIM, Q_HEADS, KV_HEADS).to(device, torch.bfloat16).eval()
    with torch.no_grad():
        for parameter in module.parameters():  # random, not the zero initialisation
            parameter.normal_(0, 0.02)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, KV_HEADS, length, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(2))
    scale = HEAD_DIM**-0.5
    row = dict(length=length, batch=batch, errors={})
    with torch.inference_mode():
        k_cmp, v_cmp = module._compress(k, v)
        step = partial(module.decode_step, q, k, v, k_cmp, v_cmp, scale=scale)
        options = dict(
            scale=scale, compress_block=module.compress_block, compress_stride=module.compress_stride,
            select_block=module.select_block, top_n=module.select_top_n, window=module.window,
        )  # fmt: skip
        tensors = (q, k, v, k_cmp, v_cmp, module.gate_weight, module.gate_bias)
        dense_step = partial(nsa_decode.nsa_decode_step_reference, *tensors, **options)
        row["max_abs_diff"] = (step().float() - dense_step().float()).abs().max().item()
        block = module.compress_block
        compress = partial(module._compress, k[:, :, -block:], v[:, :, -block:])
        q_rows = q.view(batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM)
        runs = {
            "step": step,
            "step-dense": dense_step,
            "compress": compress,
            "sdpa-cudnn": partial(_sdpa, SDPBackend.CUDNN_ATTENTION, q_rows, k, v),
            "sdpa-flash": partial(_sdpa, SDPBackend.FLASH_ATTENTION, q_rows, k, v),
        }
        for name, run in runs.items():
            row[f"{name}_ms"], error = measure(run, device)
            if error:
                row["errors"][name] = error
        if graphs:
            for name in ("step", "step-dense", "sdpa-cudnn", "sdpa-flash"):
                row[f"{name}_graph_ms"], error = measure(runs[name], device, graph=True)
                if error:
                    row["errors"][f"{name}_graph"] = error
        row["step_kernel_us"], error = kernel_us(step)
        if error:
            row["errors"]["step_kernel"] = error
    dense = row.get("sdpa-cudnn_ms")
    if dense and row.get("step_ms"):
        row["step_over_cudnn"] = row["step_ms"] / dense
        row["step_with_compress_over_cudnn"] = (row["step_ms"] + (row.get("compress_ms") or 0) / 16) / dense
    for dense_name in ("cudnn", "flash"):
        if row.get("step_graph_ms") and row.get(f"sdpa-{dense_name}_graph_ms"):
            row[f"graph_step_over_{dense_name}_graph"] = row["step_graph_ms"] / row[f"sdpa-{dense_name}_graph_ms"]
    return row


def model_rows(length: int, steps: int, device) -> list[dict]:
    import transformers

    from sparse_attn.integrations.cache import cache_keyword
    from sparse_attn.nn.nsa_models import swap_in_nsa

    rows = []
    for mode in ("sdpa", "nsa", "nsa-dense"):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SMOLLM2)
        model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
        if mode.startswith("nsa"):
            swap_in_nsa(model, start="paper")  # the paper's MLP compressors (random weights: speed only)
        else:
            model.set_attn_implementation("sdpa")
        ids = torch.randint(0, config.vocab_size, (1, length), device=device)
        runs = []
        dispatch = nsa_decode.kernel_for
        if mode == "nsa-dense":  # the dense reference path: no kernel module offered
            nsa_decode.kernel_for = lambda *args, **kwargs: None
        for _ in range(2):  # the first generation pays first-use costs (compiles, allocator, caches)
            times = []
            with torch.inference_mode():
                cache = {cache_keyword(model): transformers.DynamicCache(config=config)}
                torch.cuda.synchronize()
                start = time.perf_counter()
                token = model(ids, use_cache=True, **cache).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                prefill = (time.perf_counter() - start) * 1e3
                for _ in range(steps):
                    start = time.perf_counter()
                    token = model(token, use_cache=True, **cache).logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) * 1e3)
            runs.append((prefill, times))
        nsa_decode.kernel_for = dispatch
        (first_prefill, first_times), (prefill, times) = runs
        rows.append(
            dict(
                model="SmolLM2-135M shape, random weights",
                attention=mode,
                length=length,
                steps=steps,
                prefill_ms_first_call=first_prefill,
                first_generation_median_step_ms=statistics.median(first_times),
                prefill_ms=prefill,
                median_step_ms=statistics.median(times),
                max_step_ms=max(times),
            )  # fmt: skip
        )
        print(rows[-1], flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model decode steps")
    parser.add_argument("--model-length", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=40, help="model decode steps per generation")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/nsa_decode.py needs a CUDA GPU")
    device = torch.device("cuda")
    output = args.output or Path(__file__).parent / "results" / device_slug(device) / "nsa_decode.json"
    meta = dict(environment(device), argv=sys.argv[1:], shape=f"{Q_HEADS}/{KV_HEADS} heads, head_dim {HEAD_DIM}")
    rows, models = [], []
    for length in args.lengths:
        for batch in args.batches:
            rows.append(module_row(length, batch, device, graphs=not args.no_graphs))
            print({key: round(value, 4) if isinstance(value, float) else value for key, value in rows[-1].items()},
                  flush=True)  # fmt: skip
            write_results(rows + models, output, meta)
    if not args.no_model:
        models = model_rows(args.model_length, args.steps, device)
        write_results(rows + models, output, meta)
    header = (
        "| context | batch | NSA step ms | graphed | kernel µs | dense-path ms | graphed | compress ms | cuDNN ms "
        "| graphed | flash ms | graphed | graphed step / flash graphed |"
    )
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    for row in rows:
        cells = [row["length"], row["batch"], *(row.get(key) for key in (
            "step_ms", "step_graph_ms", "step_kernel_us", "step-dense_ms", "step-dense_graph_ms", "compress_ms",
            "sdpa-cudnn_ms", "sdpa-cudnn_graph_ms", "sdpa-flash_ms", "sdpa-flash_graph_ms", "graph_step_over_flash_graph"))]  # fmt: skip
        print("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
