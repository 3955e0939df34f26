"""Self-distillation of SeerAttention's gates (``seer`` method) on the frozen SmolLM2-135M (GPU; ``--quick`` on CPU).

The model is the embedded ``smollm2-135m`` (all 30 layers global, 9 query / 3 KV heads,
head_dim 64, 8K context), loaded in float32 and frozen. The text is the offline haystack
(``--texts``, default ``pydoc kjv essays``: the standard library's ``pydoc_data.topics``, the
King James Bible and Paul Graham's essays, as ``train_smollm2.py``; a source that is not
installed is skipped with a note, ``pydoc`` is always there), tokenized once as one stream. The last ``--heldout`` x ``--seq`` tokens are held out; training sequences are
the ``--seq``-token windows of the rest at a stride of ``--stride`` tokens (overlapping
windows put the same text at other positions; at most ``--max-sequences`` of them, drawn by a
seeded generator). Building the targets stops early (after at least 4 sequences) once 40% of
``--budget-s`` has passed, so the run stays within its time box.

For every training sequence one forward pass of the frozen model (patched with the exact
``dense`` method, ``sa.record(capture=True)``) gives each layer's post-RoPE q and k; from them
the gate inputs (pooled q and k, RoPE undone) and the target (the block max-pooled,
row-normalised attention map, ``ops.pooled_attention_map``) are computed once and kept (about
35 MB per 8K sequence for the 30 layers), so a training step touches only the gates. Training:
AdamW, lr 1e-3, 20 warm-up steps then cosine decay, no weight decay (the released SeerAttention
script's settings), ``--batch`` sequences per step, the KL of each query block row averaged
over rows, heads, sequences and layers, the first quarter of the query blocks left out (as
released). Gates: block 64, hidden size 64 (= head_dim), stored in bfloat16.

``--model gemma3-270m`` trains gates for Gemma 3 270M's three global layers instead (its
sliding-window layers need none). Writes the gates to
``src/sparse_attn/methods/seer_gates/<model>.pt`` (``--gates-out``)
right after training, then evaluates on the held-out text at ``--seq`` and half of it: per
threshold (and top-k), the mean density and attention recall (``sa.metrics``) over layers and
heads, and the held-out KL before and after training; ``xattention`` at its default threshold
is measured on the same q/k for reference. The JSON (loss curve, gate size, evaluation,
timings) goes to ``benchmarks/results/<gpu>/train_seer.json`` (``train_seer_<model>.json`` for
another model). Targets use the pooled-map Triton kernel only after it matched the reference
on random q/k of the model's shape in this run (else the reference, noted in the JSON).

    PYTHONPATH=$PWD/src python benchmarks/train_seer.py            # GPU; sized for < 4 min on an H200 (unmeasured)
    PYTHONPATH=$PWD/src python benchmarks/train_seer.py --quick    # CPU, tiny random model, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, write_results
from sparse_attn.methods.seer import shipped_gates_path
from sparse_attn.nn.seer import SeerGates, distill, distillation_targets, mean_distillation_loss, stack_targets

REPO = Path(__file__).resolve().parent.parent
THRESHOLDS = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
TOP_K = (8, 16)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """int64 ``(n,)``: the available haystack sources in order, tokenized once; ``texts`` keeps those used."""
    from sparse_attn.eval.haystack import sentences

    parts, requested = [], list(texts)
    for source in requested:
        try:
            parts.append(" ".join(sentences(source)))
        except (FileNotFoundError, ImportError) as error:
            print(f"skipping haystack source {source!r}: {error}", flush=True)
            texts.remove(source)
    if not parts:
        raise ValueError(f"none of the haystack sources {requested} is available")
    return tokenizer("\n\n".join(parts), return_tensors="pt").input_ids[0]


def windows(stream: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows ``(n, seq)`` (seeded subset) and held-out sequences ``(heldout, seq)``."""
    held = args.heldout * args.seq
    if stream.numel() < held + args.seq:
        raise ValueError(f"{stream.numel()} tokens are too few for {args.heldout} held-out and one training sequence")
    train, heldout = stream[:-held], stream[-held:].view(args.heldout, args.seq)
    starts = torch.arange(0, train.numel() - args.seq + 1, args.stride)
    order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(args.seed))[: args.max_sequences]
    return torch.stack([train[s : s + args.seq] for s in starts[order].tolist()]), heldout


def load_model(args, device):
    """(model, training windows, held-out sequences, model name)."""
    if args.quick:
        sys.path.insert(0, str(REPO / "tests" / "integrations"))
        from tiny_models import prompt, tiny_model

        model = tiny_model("qwen3").to(device)
        stream = prompt(args.seq * (args.heldout + 4), seed=args.seed)[0]
        return model, *windows(stream, args), "tiny-qwen3"
    model, tokenizer = sa.models.load(args.model, device=device)
    return model, *windows(token_stream(tokenizer, args.texts), args), args.model


@torch.no_grad()
def capture(model, ids: torch.Tensor, layers: list[int], backend: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE q and k of ``layers`` for one unpadded batch of token ids."""
    from sparse_attn.integrations.records import WHOLE_BATCH

    sa.patch(model, method="dense", min_seq_len=1, backend=backend)
    try:
        with sa.record(model, capture=True) as recorder:
            model(input_ids=ids)
    finally:
        sa.unpatch(model)
    return {layer: recorder.tensors[(layer, WHOLE_BATCH)][:2] for layer in layers}


def checked_pooled_map(model, args, device) -> tuple[object, str]:
    """The pooled-map function to build targets with, and a note: the dispatched one (the Triton
    kernel on CUDA) when it matches the reference on random q/k of the model's shape, else the reference."""
    from sparse_attn.ops.pooled_attention_map import pooled_attention_map, pooled_attention_map_reference

    if device.type != "cuda":
        return pooled_attention_map_reference, "reference (CPU)"
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, args.seq, dim, device=device, generator=generator)
    k = torch.randn(1, kv_heads, args.seq, dim, device=device, generator=generator)
    options = dict(block_q=args.block, block_k=args.block, scale=dim**-0.5)
    try:
        fast = pooled_attention_map(q, k, **options)
        difference = float((fast - pooled_attention_map_reference(q, k, **options)).abs().max())
    except Exception as error:  # noqa: BLE001 - any kernel failure falls back to the reference, with its reason
        return pooled_attention_map_reference, f"reference (the kernel failed: {error!r})"
    if not difference <= 1e-4:
        return pooled_attention_map_reference, f"reference (the kernel differs from it by {difference:.2e})"
    return pooled_attention_map, f"dispatched (kernel check: max difference {difference:.2e})"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def measure(gates: SeerGates, captured: list[dict], length: int, method: str, options: dict) -> dict:
    """Mean density, recall and estimate time of one setting over the held-out sequences' layers (first ``length`` tokens)."""
    densities, recalls, estimate_ms = [], [], []
    for layers in captured:
        for layer, (q, k) in layers.items():
            q, k = q[:, :, :length], k[:, :, :length]
            extra = {"gates": gates[layer]} if method == "seer" else {}
            if not estimate_ms:  # untimed first call: kernel compilation and gate transfer
                sa.estimate(q, k, method, **options, **extra)
            start = time.perf_counter()
            pattern = sa.estimate(q, k, method, **options, **extra)
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
            estimate_ms.append((time.perf_counter() - start) * 1e3)
            densities.append(sa.metrics.density(pattern))
            recalls.append(sa.metrics.recall(q, k, pattern))
    return {
        "density": _mean(densities),
        "recall": _mean(recalls),
        "min_layer_recall": min(recalls),
        "estimate_ms": _mean(estimate_ms),
    }


@torch.no_grad()
def evaluate(gates: SeerGates, captured: list[dict], lengths: list[int], deadline: float) -> list[dict]:
    """Per length and setting: mean density and recall over held-out sequences, layers and heads.

    Settings not started by ``deadline`` (``time.perf_counter()``) are skipped, with a note.
    """
    settings = [("seer", {"threshold": t}) for t in THRESHOLDS] + [("seer", {"top_k": k}) for k in TOP_K]
    settings.append(("xattention", {}))
    rows = []
    for length in sorted(lengths, reverse=True):
        for method, options in settings:
            if time.perf_counter() > deadline:
                print(f"time budget spent: skipping {method} {options} at {length}", flush=True)
                continue
            label = method + "".join(f" {key}={value}" for key, value in options.items())
            try:
                row = measure(gates, captured, length, method, options)
            except Exception as error:  # noqa: BLE001 - one failing setting must not lose the others (one run)
                rows.append({"length": length, "setting": label, "error": repr(error)})
                print(f"{length:>6} {label:<28} failed: {error!r}", flush=True)
                continue
            rows.append({"length": length, "setting": label, **row})
            print(
                f"{length:>6} {label:<28} density {row['density']:.3f} recall {row['recall']:.4f} "
                f"(min layer {row['min_layer_recall']:.3f}) estimate {row['estimate_ms']:.1f} ms",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on the tests' tiny random qwen3")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 600; --quick 30)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 8192; --quick 128)")
    parser.add_argument("--stride", type=int, default=None, help="tokens between training windows (default seq/4)")
    parser.add_argument("--max-sequences", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=1, help="held-out sequences (at the end of the text)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--block", type=int, default=None, help="gate block size (default 64; --quick 16)")
    parser.add_argument("--hidden", type=int, default=None, help="gate hidden size (default head_dim)")
    parser.add_argument("--texts", nargs="+", default=["pydoc", "kjv", "essays"], help="haystack sources")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="time box: targets stop at 40%% of it, evaluation settings at 100%%",
    )
    parser.add_argument("--gates-out", type=Path, help="where to write the gates (default: the shipped file)")
    parser.add_argument("--output", type=Path, help="results JSON (default benchmarks/results/<gpu>/train_seer.json)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.steps = args.steps or (30 if quick else 600)
    args.seq = args.seq or (128 if quick else 8192)
    args.stride = args.stride or max(1, args.seq // 4)
    args.block = args.block or (16 if quick else 64)
    if quick:
        args.max_sequences = min(args.max_sequences, 8)
    device = torch.device("cpu" if quick or not torch.cuda.is_available() else "cuda")
    # Captures run exact attention on the reference backend: no kernel compilation, any dtype.
    backend = "reference"
    started = time.perf_counter()

    model, train_ids, heldout_ids, model_name = load_model(args, device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    gates = SeerGates.for_model(model, block_size=args.block, hidden_size=args.hidden, name=model_name, seed=args.seed)
    gates.to(device)
    print(
        f"{model_name}: {len(gates.layers)} gated layers, {gates.num_parameters():,} gate parameters; "
        f"{len(train_ids)} training windows and {len(heldout_ids)} held-out sequences of {args.seq} tokens",
        flush=True,
    )

    pooled_map, pooled_map_note = checked_pooled_map(model, args, device)
    print(f"targets: pooled map {pooled_map_note}", flush=True)
    start = time.perf_counter()
    options = dict(backend=backend, pooled_map=pooled_map)
    parts = []
    for ids in train_ids:
        if len(parts) >= 4 and time.perf_counter() - started > 0.4 * args.budget_s:
            print(f"time budget: training on {len(parts)} of {len(train_ids)} windows", flush=True)
            break
        parts.append(distillation_targets(model, ids[None].to(device), gates, **options))
    train_ids = train_ids[: len(parts)]
    data = stack_targets(parts)
    del parts
    heldout_data = stack_targets(
        [distillation_targets(model, ids[None].to(device), gates, **options) for ids in heldout_ids]
    )
    targets_s = time.perf_counter() - start
    heldout_before = mean_distillation_loss(gates, heldout_data)
    print(f"targets of {len(train_ids) + len(heldout_ids)} sequences in {targets_s:.1f} s", flush=True)

    heldout_curve = [(0, heldout_before)]

    def validate(step: int) -> None:
        heldout_curve.append((step, mean_distillation_loss(gates, heldout_data)))
        print(f"step {step}: held-out KL {heldout_curve[-1][1]:.4f}", flush=True)

    start = time.perf_counter()
    losses = distill(
        gates,
        data,
        steps=args.steps,
        lr=args.lr,
        warmup=min(args.warmup, args.steps),
        batch_size=args.batch,
        callback=validate,
        callback_every=max(1, args.steps // 10),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - start
    heldout_after = mean_distillation_loss(gates, heldout_data)
    del data
    print(
        f"{args.steps} steps in {train_s:.1f} s ({args.steps / train_s:.1f} steps/s): train loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}; held-out KL {heldout_before:.4f} -> {heldout_after:.4f}",
        flush=True,
    )

    scratch = Path(tempfile.gettempdir())
    gates_path = args.gates_out or (scratch / "train_seer_quick_gates.pt" if quick else shipped_gates_path(model_name))
    gates.meta = {
        "trained_on": args.texts if not quick else "random tokens",
        "seq": args.seq,
        "steps": args.steps,
        "heldout_kl_before": heldout_before,
        "heldout_kl_after": heldout_after,
    }
    size = gates.save(gates_path)
    print(f"gates: {gates_path} ({size / 2**20:.2f} MiB)", flush=True)

    start = time.perf_counter()
    captured = [capture(model, ids[None].to(device), gates.layers, backend) for ids in heldout_ids]
    lengths = sorted({args.seq // 2 // args.block * args.block, args.seq})
    evaluation = evaluate(SeerGates.load(gates_path, device=device), captured, lengths, started + args.budget_s)
    eval_s = time.perf_counter() - start

    meta = {
        "benchmark": "train_seer",
        "model": model_name,
        "quick": quick,
        "steps": args.steps,
        "seq": args.seq,
        "stride": args.stride,
        "batch": args.batch,
        "lr": args.lr,
        "warmup": args.warmup,
        "block": args.block,
        "hidden": gates[gates.layers[0]].hidden_size,
        "texts": args.texts,
        "train_sequences": len(train_ids),
        "heldout_sequences": len(heldout_ids),
        "gate_parameters": gates.num_parameters(),
        "gate_file_bytes": size,
        "gates_path": str(gates_path),
        "train_loss": losses,
        "heldout_kl_before": heldout_before,
        "heldout_kl_after": heldout_after,
        "heldout_kl_curve": heldout_curve,
        "pooled_map": pooled_map_note,
        "targets_s": targets_s,
        "train_s": train_s,
        "steps_per_s": args.steps / train_s,
        "eval_s": eval_s,
        "total_s": time.perf_counter() - started,
        **environment(device),
    }
    folder = scratch if quick else Path(__file__).parent / "results" / device_slug(device)
    name = "train_seer_quick" if quick else "train_seer" + ("" if model_name == "smollm2-135m" else f"_{model_name}")
    output = args.output or folder / f"{name}.json"
    write_results(evaluation, output, meta)
    print(f"results: {output}; total {meta['total_s']:.1f} s", flush=True)
    return {"meta": meta, "rows": evaluation}


if __name__ == "__main__":
    main()
