"""Continued training of SmolLM2-135M at 8K tokens: dense attention against a block-sparse
method in every layer, same seed and same batches (GPU).

The model is the embedded ``smollm2-135m`` (all 30 layers global, 8K context), loaded in
float32 and trained under bfloat16 autocast with AdamW (lr 3e-5 after 10 warm-up steps,
betas (0.9, 0.95), no weight decay, gradient norm clipped at 1.0), one sequence of ``--seq``
tokens per step. The text is the standard library's ``pydoc_data.topics`` (offline), tokenized
once and cut into sequences; the last two are held out for a validation loss every
``--eval-every`` steps; training sequences are drawn by a seeded generator, so both runs
see the same batches in the same order. The sparse run patches every layer with ``--method``
(``sa.patch(model, method=..., min_seq_len=1024)``): attention forward and backward run on the
sparse-attn engine, and the estimator's block choice is not differentiated.

Writes ``benchmarks/results/<gpu>/training_smollm2.json`` (loss curves, tokens/s, peak
memory) and ``training_smollm2.png``. With ``--save DIR`` the two trained models are saved
under ``DIR/dense`` and ``DIR/<method>`` (checkpoints stay out of git), so the eval tasks can
be run on each with the same sparse method:

    python benchmarks/train_smollm2.py --steps 300 --save /tmp/ckpt
    sparse-attn eval --model /tmp/ckpt/xattention --methods xattention --lengths 4096 7680
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, write_results


def token_sequences(tokenizer, seq: int, texts: list[str]) -> torch.Tensor:
    """int64 ``(n, seq)``: the haystack texts in order, tokenized once, cut into whole sequences."""
    from sparse_attn.eval.haystack import sentences

    text = "\n\n".join(" ".join(sentences(source)) for source in texts)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq
    return ids[: n * seq].view(n, seq)


def learning_rate(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


@torch.no_grad()
def validation_loss(model, sequences: torch.Tensor, device) -> float:
    model.eval()
    losses = [float(model(input_ids=s[None].to(device), labels=s[None].to(device)).loss) for s in sequences]
    model.train()
    return sum(losses) / len(losses)


def train(mode: str, args, sequences: torch.Tensor, device) -> dict:
    torch.manual_seed(args.seed)
    model, _ = sa.models.load("smollm2-135m", dtype=torch.float32, device=device)
    if mode != "dense":
        sa.patch(model, method=mode, min_seq_len=1024)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    train_set, held_out = sequences[:-2], sequences[-2:]
    order = torch.randint(len(train_set), (args.steps,), generator=torch.Generator().manual_seed(args.seed))
    losses, validation, step_seconds = [], [], []
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        batch = train_set[order[step]][None].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, 10)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{mode}: loss is {losses[-1]} at step {step}")
        if step % args.eval_every == 0 or step == args.steps - 1:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                validation.append((step, validation_loss(model, held_out, device)))
            print(f"{mode} step {step}: loss {losses[-1]:.4f} validation {validation[-1][1]:.4f}", flush=True)
    steady = sorted(step_seconds[5:])[len(step_seconds[5:]) // 2] if len(step_seconds) > 5 else step_seconds[-1]
    result = {
        "mode": mode,
        "train_loss": losses,
        "validation_loss": validation,
        "median_step_s": steady,
        "tokens_per_s": args.seq / steady,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }
    if args.save:
        if mode != "dense":
            sa.unpatch(model)
        model.save_pretrained(args.save / mode)
        sa.models.load("smollm2-135m")[1].save_pretrained(args.save / mode)
    del model, optimizer
    torch.cuda.empty_cache()
    return result


def plot(results: list[dict], path: Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for result in results:
        losses = torch.tensor(result["train_loss"])
        smooth = losses.unfold(0, window, 1).mean(1) if len(losses) >= window else losses
        axis.plot(
            range(len(losses) - len(smooth), len(losses)), smooth, label=f"{result['mode']} (train, {window}-step mean)"
        )
        steps, values = zip(*result["validation_loss"], strict=False)
        axis.plot(steps, values, "o--", label=f"{result['mode']} (validation)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("SmolLM2-135M continued training at 8K tokens")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--method", default="xattention", help="the block-sparse method of the sparse run")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts", nargs="+", default=["kjv", "essays", "pydoc"], help="haystack sources")
    parser.add_argument("--save", type=Path, help="save the trained models under DIR/dense and DIR/<method>")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    _, tokenizer = sa.models.load("smollm2-135m")
    sequences = token_sequences(tokenizer, args.seq, args.texts)
    print(f"{len(sequences)} sequences of {args.seq} tokens", flush=True)
    results = [train(mode, args, sequences, device) for mode in ("dense", args.method)]
    folder = args.output or Path(__file__).parent / "results" / device_slug(device)
    meta = {
        "benchmark": "train_smollm2",
        "steps": args.steps,
        "seq": args.seq,
        "method": args.method,
        "texts": args.texts,
        "sequences": len(sequences),
        **environment(device),
    }
    write_results(results, folder / "training_smollm2.json", meta)
    plot(results, folder / "training_smollm2.png")
    for result in results:
        print(
            f"{result['mode']}: final validation {result['validation_loss'][-1][1]:.4f}, "
            f"{result['tokens_per_s']:.0f} tokens/s, peak {result['peak_memory_gib']:.1f} GiB"
        )


if __name__ == "__main__":
    main()
