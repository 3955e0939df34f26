"""Estimators against dense attention: estimation cost, kernel cost, density and recall (GPU).

Batch 1, 32 query heads, 8 KV heads, head_dim 128, bf16, causal, 128 x 128 blocks, at 32K
and 128K by default. Inputs are structured, since random q/k give uniform attention and
every method goes dense: q and k share one direction plus Gaussian noise, then RoPE
(base 10000) is applied, which concentrates attention locally and on the sequence start.

Per method: estimation ms (``triton.testing.do_bench`` median of ``sa.estimate``), kernel ms
(``sa.block_sparse_attention``, Triton backend, on the estimated pattern), their total, the
ratio of the total to dense cuDNN SDPA and to dense FlexAttention measured in the same run,
the ratio of the total to the ideal ``density x dense`` time, density, attention recall
(``sa.metrics.recall``, exact, on ``--recall-heads`` query heads, one per KV group, to keep
it affordable at 128K: the reference backend it uses is chunked PyTorch), and the peak
extra memory of estimation (``torch.cuda.max_memory_allocated`` above what was allocated
before). Prints a plain table and writes ``benchmarks/results/<gpu>/estimators.json``.

``--inputs gemma3-270m`` measures on real activations instead: the embedded Gemma 3 270M
reads a needle-in-a-haystack prompt of each length once (bf16 on CUDA; its global layers
run dense through ``sa.patch``), and the post-RoPE q, k, v of each of its 3 global layers
(4 query heads, 1 KV head, head_dim 256; ``sa.record(model, capture=True)``) are the
inputs, one row per layer and method. The model's context limit is 32K.

``--scale`` measures what estimation costs at long lengths (default 256K, 512K and 1M tokens;
``--lengths`` overrides): per method, the estimate's time, its peak extra memory
(``torch.cuda.max_memory_allocated`` during a call after a warm-up call, above what was
allocated before it: the inputs and anything else live), the pattern's own size (the
estimate's output) and the peak without it; plus dense cuDNN SDPA on the same inputs when it
fits. No kernel time, FlexAttention or recall there (each would take minutes at 1M). A call
that takes over ``--single-call-ms`` is timed once (dense cuDNN at 1M, for instance) instead
of with ``do_bench``'s repeats; the table says which. Writes
``benchmarks/results/<gpu>/estimators_scale.json``.

    python benchmarks/estimators.py                          # 32K and 128K, the dynamic methods
    python benchmarks/estimators.py --lengths 131072 --methods xattention flexprefill
    python benchmarks/estimators.py --methods xattention xattention:score_precision=fp8   # method options
    python benchmarks/estimators.py --quick                  # tiny sizes, runs on CPU too (no JSON unless --out)
    python benchmarks/estimators.py --inputs gemma3-270m --lengths 16384 32768
    python benchmarks/estimators.py --scale                  # 256K, 512K, 1M: memory and time of estimation
    python benchmarks/estimators.py --scale --quick          # the same on tiny sizes (CPU too)
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.bench import dense_baselines, device_slug, environment, format_table, measure, time_ms, write_results
from sparse_attn.eval.grid import MethodVariant
from sparse_attn.pattern import BlockSparsePattern
from sparse_attn.utils import synchronized_now

DYNAMIC_METHODS = ("xattention", "flexprefill", "vertical_slash", "block_topk", "proxyattn")

COLUMNS = [
    ("inputs", "inputs", "s"),
    ("seq", "seq", "d"),
    ("method", "method", "s"),
    ("estimate_ms", "estimate ms", ".2f"),
    ("kernel_ms", "kernel ms", ".2f"),
    ("total_ms", "total ms", ".2f"),
    ("dense_ms", "dense ms", ".2f"),
    ("flex_dense_ms", "flex dense ms", ".2f"),
    ("total_vs_dense", "total/dense", ".3f"),
    ("total_vs_flex_dense", "total/flex", ".3f"),
    ("total_vs_ideal", "total/ideal", ".2f"),
    ("estimate_share_of_dense", "est/dense", ".3f"),
    ("density", "density", ".3f"),
    ("recall", "recall", ".4f"),
    ("estimate_peak_mib", "est peak MiB", ".0f"),
]


SCALE_LENGTHS = [262144, 524288, 1048576]

SCALE_COLUMNS = [
    ("seq", "seq", "d"),
    ("method", "method", "s"),
    ("estimate_ms", "estimate ms", ".1f"),
    ("estimate_timing", "timed by", "s"),
    ("dense_ms", "dense ms", ".1f"),
    ("dense_timing", "timed by", "s"),
    ("estimate_share_of_dense", "est/dense", ".3f"),
    ("estimate_peak_mib", "est peak MiB", ".0f"),
    ("pattern_mib", "pattern MiB", ".0f"),
    ("peak_without_pattern_mib", "peak-pattern MiB", ".0f"),
    ("density", "density", ".3f"),
    ("max_kv", "max_kv", "d"),
]


@dataclass(frozen=True)
class Shape:
    seq: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block: int = 128
    dtype: torch.dtype = torch.bfloat16


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half convention) over positions 0..S-1, float32."""
    seq, dim = x.shape[-2], x.shape[-1]
    inverse_frequency = base ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * inverse_frequency[None, :]
    cos, sin = torch.cos(angles).repeat(1, 2), torch.sin(angles).repeat(1, 2)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def structured_qkv(shape: Shape, *, strength: float, device: torch.device, seed: int = 0):
    """q, k share a unit direction scaled by ``strength`` plus N(0, 1) noise; RoPE applied; v is N(0, 1).

    ``strength ** 2 / sqrt(head_dim)`` is the logit a query gives a key at distance 0 through
    the shared direction, against ~N(0, 1) logits from the noise. Built one head at a time
    in float32, stored in ``shape.dtype``.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    direction = torch.randn(shape.head_dim, device=device, generator=generator)
    shared = strength * direction / direction.norm()

    def draw(heads: int, structured: bool) -> torch.Tensor:
        out = torch.empty(1, heads, shape.seq, shape.head_dim, device=device, dtype=shape.dtype)
        for head in range(heads):
            x = torch.randn(shape.seq, shape.head_dim, device=device, generator=generator)
            out[0, head] = rope(x + shared) if structured else x
        return out

    return draw(shape.q_heads, True), draw(shape.kv_heads, True), draw(shape.kv_heads, False)


def dense_runners(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """Dense causal attention: SDPA (cuDNN on CUDA; K/V expanded outside the timing) and FlexAttention."""
    sdpa = next(iter(dense_baselines(q, k, v, q.device).values()))
    full = sa.dense_pattern(seq_q=q.shape[2], seq_k=k.shape[2], device=q.device)
    return {
        "dense_ms": sdpa,
        "flex_dense_ms": lambda: sa.block_sparse_attention(q, k, v, full, backend="flex"),
    }


def head_subset(pattern: BlockSparsePattern, query_heads: list[int], total_q_heads: int) -> BlockSparsePattern:
    """The pattern restricted to some query heads (per-query-head or per-KV-head patterns)."""
    per_pattern_head = total_q_heads // pattern.num_heads
    rows = torch.tensor([head // per_pattern_head for head in query_heads], device=pattern.device)
    return BlockSparsePattern(
        kv_counts=pattern.kv_counts[:, rows].contiguous(),
        kv_indices=pattern.kv_indices[:, rows].contiguous(),
        block_q=pattern.block_q,
        block_k=pattern.block_k,
        seq_q=pattern.seq_q,
        seq_k=pattern.seq_k,
    )


def subset_recall(q: torch.Tensor, k: torch.Tensor, pattern: BlockSparsePattern, heads: int) -> tuple[float, int]:
    """``sa.metrics.recall`` on ``heads`` query heads, the first of each of as many KV groups."""
    group = q.shape[1] // k.shape[1]
    kv_heads = list(range(0, k.shape[1], max(1, k.shape[1] // heads)))[:heads]
    query_heads = [kv_head * group for kv_head in kv_heads]
    sub = head_subset(pattern, query_heads, q.shape[1])
    return sa.metrics.recall(q[:, query_heads], k[:, kv_heads], sub), len(query_heads)


def peak_extra_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def timed_ms(fn, device: torch.device, *, single_call_ms: float) -> tuple[float, str]:
    """``(ms, how)``: one synchronized call; when it took ``single_call_ms`` or more, that call's time
    (``"1 call"``), else the median of repeated calls (``"median"``: ``do_bench`` on CUDA)."""
    start = synchronized_now(device)
    fn()
    elapsed = (synchronized_now(device) - start) * 1e3
    if elapsed >= single_call_ms:
        return elapsed, "1 call"
    return time_ms(fn, device), "median"


def error_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def method_estimate(q: torch.Tensor, k: torch.Tensor, method: str, block: int):
    """``sa.estimate`` of a ``NAME`` or ``NAME:OPTION=VALUE,...`` method (e.g.
    ``xattention:score_precision=fp8``), as a zero-argument call."""
    variant = MethodVariant.parse(method)
    options = dict(variant.options)
    if variant.name == "seer" and "gates" not in options:
        options["gates"] = untrained_gate(q, k)
    return functools.partial(sa.estimate, q, k, variant.name, block_q=block, block_k=block, **options)


UNTRAINED_GATE_NOTE = "untrained gate (nn.Linear initialisation, seed 0): time and memory only, density not meaningful"


def untrained_gate(q: torch.Tensor, k: torch.Tensor):
    """A SeerAttention gate for the synthetic shape, randomly initialised (no trained gate exists for
    it): the gate's cost does not depend on its weights, its pattern does (rows say so)."""
    from sparse_attn.nn.seer import AttnGate

    with torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else []):
        torch.manual_seed(0)
        gate = AttnGate(q_heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[-1])
    return gate.to(q.device)


# Rows finished so far in this run and where to write them: each row is written as it finishes
# (``"complete": false`` in the metadata), so a run cut short by a time limit keeps its rows.
_finished: list[dict] = []
_partial_out: tuple[Path, dict] | None = None


def finished(row: dict) -> None:
    """Record a finished ``row`` and, with an output path, rewrite the JSON with every row so far."""
    _finished.append(row)
    if _partial_out is not None:
        path, meta = _partial_out
        write_results(list(_finished), path, {**meta, "complete": False})


def run_scale(shape: Shape, methods, *, strength: float, device: torch.device, single_call_ms: float) -> list[dict]:
    """Estimation at a long length: time and peak extra memory per method, dense cuDNN on the same inputs."""
    q, k, v = structured_qkv(shape, strength=strength, device=device)
    dense = {}
    try:
        # K/V expanded to the query heads live only inside this block; a length where that or the
        # attention itself does not fit reports the error instead of a time.
        dense["dense_backend"], sdpa = next(iter(dense_baselines(q, k, v, device).items()))
        dense["dense_ms"], dense["dense_timing"] = timed_ms(sdpa, device, single_call_ms=single_call_ms)
        del sdpa
    except Exception as error:
        dense["dense_error"] = error_line(error)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    labels = {
        "inputs": "structured",
        "strength": strength,
        "q_heads": shape.q_heads,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "block": shape.block,
        "dtype": str(shape.dtype).removeprefix("torch."),
    }
    rows = []
    for method in methods:
        row = {"seq": shape.seq, "method": method, **labels, **dense, "errors": {}}
        if MethodVariant.parse(method).name == "seer":
            row["note"] = UNTRAINED_GATE_NOTE
        estimate = method_estimate(q, k, method, shape.block)
        try:
            pattern = estimate()  # warm-up: the first call autotunes the scoring kernels
            row["pattern_mib"] = (pattern.kv_indices.numel() + pattern.kv_counts.numel()) * 4 / 2**20
            row["density"], row["max_kv"] = pattern.density(), pattern.max_kv
            del pattern
            row["estimate_peak_mib"] = peak_extra_mib(estimate, device)
            row["estimate_ms"], row["estimate_timing"] = timed_ms(estimate, device, single_call_ms=single_call_ms)
        except Exception as error:
            row["errors"]["estimate"] = error_line(error)
        if row.get("estimate_peak_mib") is not None:
            row["peak_without_pattern_mib"] = row["estimate_peak_mib"] - row["pattern_mib"]
        row["estimate_share_of_dense"] = ratio(row.get("estimate_ms"), row.get("dense_ms"))
        rows.append(row)
        finished(row)
        print(format_table([row], SCALE_COLUMNS), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_profile(label: str, fn, device: torch.device, top: int = 12) -> None:
    """Where one warmed-up call spends its GPU time: the ``top`` kernels by total CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    print(f"--- profile: {label}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70), flush=True)
    print_timeline(prof.events(), top=min(top, 8))


SYNC_OPS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::nonzero",
)


def print_timeline(events, top: int = 8) -> None:
    """The GPU's idle gaps in one profiled call: span from the first kernel's start to the last
    kernel's end, busy time (kernels and copies, overlaps merged), the ``top`` widest gaps
    with the kernels on either side, and the host calls that wait for the GPU (syncs)."""
    from torch.autograd import DeviceType

    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not spans:
        return
    busy, gaps, end, previous = 0.0, [], spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, previous, name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, previous = stop, name
    span = end - spans[0][0]
    syncs: dict[str, int] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in SYNC_OPS:
            syncs[e.name] = syncs.get(e.name, 0) + 1
    print(
        f"timeline: {len(spans)} GPU ops, span {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, "
        f"idle {(span - busy) / 1e3:.3f} ms in {len(gaps)} gaps; host waits: {syncs or 'none'}"
    )
    for gap, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  gap {gap / 1e3:.3f} ms after {before[:60]} before {after[:60]}")


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def gemma_inputs(model, tokenizer, length: int, device: torch.device) -> list[tuple[str, tuple]]:
    """``(label, (q, k, v))`` per global layer of gemma3-270m on a needle prompt of ``length`` tokens."""
    from sparse_attn.eval.tasks import get_task
    from sparse_attn.integrations import patch, record, unpatch

    sample = get_task("niah").make(tokenizer, length, 0.5, 0)
    ids = torch.tensor([sample.input_ids], device=device)
    patch(model, "dense", min_seq_len=min(length, 1024))
    try:
        with torch.inference_mode(), record(model, capture=True) as recorder:
            model(ids, use_cache=False, logits_to_keep=1)
    finally:
        unpatch(model)
    return [(f"gemma3-270m L{layer}", tensors) for (layer, _), tensors in sorted(recorder.tensors.items())]


def run_length(
    shape: Shape,
    methods,
    *,
    strength: float,
    recall_heads: int,
    device: torch.device,
    kernel_backend: str,
    profile: int = 0,
):
    """Every method on the structured inputs of ``shape``."""
    q, k, v = structured_qkv(shape, strength=strength, device=device)
    return run_inputs(
        q,
        k,
        v,
        methods,
        block=shape.block,
        labels={"inputs": "structured", "strength": strength},
        recall_heads=recall_heads,
        device=device,
        kernel_backend=kernel_backend,
        profile=profile,
    )


def run_inputs(
    q,
    k,
    v,
    methods,
    *,
    block: int,
    labels: dict,
    recall_heads: int,
    device: torch.device,
    kernel_backend: str,
    profile: int = 0,
):
    """Every method on given ``q, k, v``; ``labels`` are copied into each row; ``profile``: how
    many of each estimate's top GPU kernels to print (0: none)."""
    seq = k.shape[2]
    dense = {name: measure(fn, device) for name, fn in dense_runners(q, k, v).items()}
    rows = []
    for method in methods:
        row = {
            "seq": seq,
            "method": method,
            "q_heads": q.shape[1],
            "kv_heads": k.shape[1],
            "head_dim": q.shape[-1],
            "block": block,
            "dtype": str(q.dtype).removeprefix("torch."),
            **labels,
            "errors": {},
        }
        for name, (ms, error) in dense.items():
            row[name] = ms
            if error:
                row["errors"][name] = error
        if MethodVariant.parse(method).name == "seer" and labels.get("inputs") == "structured":
            row["note"] = UNTRAINED_GATE_NOTE
        estimate = method_estimate(q, k, method, block)
        try:
            # The first call autotunes the scoring kernels (their benchmarking allocates a 256 MB
            # cache-flush buffer): peak memory is taken on the call after it.
            pattern = estimate()
            row["estimate_peak_mib"] = peak_extra_mib(estimate, device)
        except Exception as error:
            row["errors"]["estimate"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            rows.append(row)
            finished(row)
            continue
        row["estimate_ms"], _ = measure(estimate, device)
        if profile and device.type == "cuda":
            print_profile(f"{method} estimate at {seq}", estimate, device, top=profile)
        attend = functools.partial(sa.block_sparse_attention, q, k, v, pattern, backend=kernel_backend)
        row["kernel_ms"], kernel_error = measure(attend, device)
        if kernel_error:
            row["errors"]["kernel"] = kernel_error
        row["density"] = pattern.density()
        row["total_ms"] = None if row["kernel_ms"] is None else row["estimate_ms"] + row["kernel_ms"]
        row["total_vs_dense"] = ratio(row["total_ms"], row.get("dense_ms"))
        row["total_vs_flex_dense"] = ratio(row["total_ms"], row.get("flex_dense_ms"))
        dense_ms = row.get("dense_ms")
        row["total_vs_ideal"] = ratio(row["total_ms"], None if dense_ms is None else row["density"] * dense_ms)
        row["estimate_share_of_dense"] = ratio(row["estimate_ms"], dense_ms)
        if recall_heads:
            row["recall"], row["recall_heads"] = subset_recall(q, k, pattern, recall_heads)
        rows.append(row)
        finished(row)
        print(format_table([row], COLUMNS), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="sequence lengths (default 32768 131072; --scale: 256K 512K 1M)",
    )
    parser.add_argument("--methods", nargs="+", default=list(DYNAMIC_METHODS))
    parser.add_argument("--strength", type=float, default=12.0, help="norm of the shared q/k direction")
    parser.add_argument("--recall-heads", type=int, default=4, help="query heads used for recall (0: skip recall)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (1K tokens, 4/2 heads, D 64, float32)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>/estimators.json)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        nargs="?",
        const=12,
        default=0,
        help="also print each estimate's top N GPU kernels (CUDA; N default 12)",
    )
    parser.add_argument(
        "--inputs",
        choices=["structured", "gemma3-270m"],
        default="structured",
        help="synthetic structured q/k (default) or the global layers' q/k/v of gemma3-270m on a needle prompt",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="long lengths: each estimator's time and peak extra memory (pattern included and without it), and "
        "dense cuDNN time; no kernel time or recall",
    )
    parser.add_argument(
        "--single-call-ms",
        type=float,
        default=1000.0,
        help="--scale: a call taking at least this long is timed once instead of with do_bench (default 1000)",
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        raise SystemExit("benchmarks/estimators.py needs a CUDA GPU; on CPU run it with --quick")
    if args.scale and args.inputs != "structured":
        raise SystemExit("--scale runs on the structured inputs only")
    if args.quick:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        shapes = [Shape(seq=1024, q_heads=4, kv_heads=2, head_dim=64, block=64, dtype=dtype)]
    else:
        lengths = args.lengths or (SCALE_LENGTHS if args.scale else [32768, 131072])
        shapes = [Shape(seq=seq) for seq in lengths]
    global _partial_out
    if args.scale:
        _partial_out = _scale_output(args, device)
        run_scale_lengths(shapes, args, device)
        return
    kernel_backend = "auto" if device.type == "cuda" else "reference"
    _partial_out = _main_output(args, device, kernel_backend)
    common = dict(recall_heads=args.recall_heads, device=device, kernel_backend=kernel_backend, profile=args.profile)
    rows = []
    if args.inputs == "gemma3-270m":
        from sparse_attn.models import load

        model, tokenizer = load("gemma3-270m", dtype=shapes[0].dtype, device=device)
        limit = model.config.max_position_embeddings
        if any(shape.seq > limit for shape in shapes):
            raise SystemExit(f"gemma3-270m reads at most {limit} tokens; pass --lengths up to that")
        for shape in shapes:
            for label, (q, k, v) in gemma_inputs(model, tokenizer, shape.seq, device):
                rows += run_inputs(q, k, v, args.methods, block=shape.block, labels={"inputs": label}, **common)
    else:
        for shape in shapes:
            rows += run_length(shape, args.methods, strength=args.strength, **common)
    print()
    print(format_table(rows, COLUMNS))
    for row in rows:
        if row["errors"]:
            print(f"  {row['seq']} {row['method']} errors: {row['errors']}")
    if args.recall_heads and rows:
        heads = min(args.recall_heads, min(row["kv_heads"] for row in rows))
        print(f"recall: exact, on {heads} query heads (one per KV group)")
    if _partial_out is not None:
        out, meta = _partial_out
        write_results(rows, out, {**meta, "complete": True})
        print(f"wrote {out}")


def _main_output(args, device: torch.device, kernel_backend: str) -> tuple[Path, dict] | None:
    """The JSON path and metadata of a (non ``--scale``) run, or None when nothing is written."""
    out = args.out
    if out is None and device.type == "cuda" and not args.quick:
        name = "estimators.json" if args.inputs == "structured" else f"estimators_{args.inputs}.json"
        out = Path(__file__).parent / "results" / device_slug(device) / name
    if out is None:
        return None
    inputs = (
        "shared direction + noise, RoPE" if args.inputs == "structured" else f"{args.inputs} global layers, niah prompt"
    )
    return out, {"benchmark": "estimators", "kernel_backend": kernel_backend, "inputs": inputs, **environment(device)}


def _scale_output(args, device: torch.device) -> tuple[Path, dict] | None:
    """The JSON path and metadata of a ``--scale`` run, or None when nothing is written."""
    out = args.out
    if out is None and device.type == "cuda" and not args.quick:
        out = Path(__file__).parent / "results" / device_slug(device) / "estimators_scale.json"
    if out is None:
        return None
    meta = {
        "benchmark": "estimators --scale",
        "inputs": "shared direction + noise, RoPE",
        "single_call_ms": args.single_call_ms,
        **environment(device),
    }
    return out, meta


def run_scale_lengths(shapes: list[Shape], args, device: torch.device) -> None:
    rows = []
    for shape in shapes:
        rows += run_scale(
            shape, args.methods, strength=args.strength, device=device, single_call_ms=args.single_call_ms
        )
    print()
    print(format_table(rows, SCALE_COLUMNS))
    for row in rows:
        errors = {**row["errors"], **({"dense": row["dense_error"]} if "dense_error" in row else {})}
        if errors:
            print(f"  {row['seq']} {row['method']} errors: {errors}")
    print(
        f"timed by: '1 call' = one synchronized call (calls of {args.single_call_ms:.0f} ms or more are not repeated), "
        "'median' = do_bench median (CUDA) or median of 5 calls (CPU); est peak: peak extra memory of one estimate "
        "after a warm-up call, above what was allocated before it (inputs excluded); pattern: the estimate's output"
    )
    backends = sorted({row["dense_backend"] for row in rows if "dense_backend" in row})
    print(f"dense: causal SDPA on the same inputs ({', '.join(backends) or 'did not run'})")
    if _partial_out is not None:
        out, meta = _partial_out
        write_results(rows, out, {**meta, "complete": True})
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
