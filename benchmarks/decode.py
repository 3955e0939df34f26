"""Attention time per decode step: sparse decode methods over a paged KV cache against dense decode (GPU).

Shape: 32 query / 8 KV heads, head_dim 128, bf16, one new query token per sequence, every
sequence of the batch at the stated context. Per (context, batch):

- dense baselines: SDPA with cuDNN and with FlashAttention (``torch.nn.attention.sdpa_kernel``;
  the group's 4 query heads as 4 query rows of their KV head, so K/V are not expanded),
  compiled FlexAttention (``enable_gqa``), and our split-K paged kernel with every page
  selected (``ours_dense``);
- per decode method and token budget (and, for ``quest``, per selection level: ``--levels``;
  two levels rank the cache's super-pages of ``--super-page`` pages first): the selection
  alone (``select_ms``), the paged attention alone on that selection (``attend_ms``), and both
  (``step_ms``: what a decode step costs), ``other_ms = step - select - attend`` (what the
  step adds: launches between them, argument checks, allocations), with ``step / cuDNN``
  (issue 17's target: <= 0.1 at 128K, batch 8, budget 2048) and ``select / step`` (target:
  <= 0.2); the same three timings again with each part captured in a CUDA graph
  (``*_graph_ms``), where host launch overhead is gone; two-level rows also give the share of
  the one-level pages they select (``same_as_1_level``: random keys, so the coarse bounds
  separate little: a worst case for the approximation);
- the bandwidth floor: the bytes each step reads (K and V of the tokens read; the summaries
  or label cache the selection reads, reported apart) over ``--peak-tbps`` (default 4.8 TB/s,
  the H200's HBM3e peak from its data sheet; issue 17 measured about 4.3 TB/s in practice).

Page sizes 16 / 32 / 64 are compared at one configuration (``--page-config``, default 128K
context, batch 8, budget 2048; quest at each of ``--levels``); the rest of the grid uses
16-token pages. Beside the wall-clock timings, the profiler's kernel times of the selection and
of the attention (``select_kernel_us``, ``attend_kernel_us``: GPU time only, no launch gaps or
graph replay cost; ``--no-kernel-times`` skips them) give ``select_share_kernel``, the
selection's share of the step's GPU time. Pages are laid out
in order in the pool (a freshly prefilled cache). The selection runs as a sparse layer does
(past the method's dense layers). Double Sparsity's label channels are the first ``D // 16``
channels (speed does not depend on which); ``tidaldecode``'s reuse layers cost what
``double_sparsity``'s attention costs (token-level lists of the same size) and its
selection layers what ``ours_dense`` plus the scoring costs, so it is not timed apart.
``retrieval`` builds its clustered index at a layer's first step: ``index_build_ms`` times
that build alone (k-means over the whole cache, once per layer); the step timings are the
steps after it (the index in place, as between updates).
A decode step is a handful of small kernels, so launch overhead shows: ``step_graph_ms`` and
``sdpa-cudnn_graph_ms`` / ``sdpa-flash_graph_ms`` / ``ours_dense_graph_ms`` replay the step (and
the dense decodes) captured in a CUDA graph, as a serving loop would (``--no-graphs`` skips
them; a failed capture is reported in the row). At batch 1 the eager timings of our paged
kernel (a Python wrapper, two launches) measure the host more than the GPU.
Medians from ``triton.testing.do_bench`` (60 ms of repetitions per timing). Writes ``benchmarks/results/<gpu>/decode.json``.

    python benchmarks/decode.py            # the grid (a few minutes on an H200, compile included)
    python benchmarks/decode.py --quick    # 32K and 128K, batch 8, budget 2048, quest with 1 and 2 levels
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_attn.bench import device_slug, environment, format_table, write_results
from sparse_attn.decode import PagedKVCache, get_decode_method
from sparse_attn.decode.selection import dense_selection
from sparse_attn.ops.paged_decode import paged_decode

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
BYTES = 2  # bf16
PREFILL_CHUNK = 8192
# Two-level quest's oversample (``--oversample``), set once in main().
OVERSAMPLE = [2]
# Quest's reselect_every (``--reselect-every``), set once in main().
RESELECT_EVERY = [1]
# A layer past every method's dense layers (Quest keeps 2 dense), so the sparse rule runs.
SPARSE_LAYER = 3


def build_cache(k: torch.Tensor, v: torch.Tensor, page_size: int, super_page: int = 16) -> PagedKVCache:
    """A paged cache holding ``k`` / ``v`` ``(B, Hkv, S, D)``, appended in prefill chunks."""
    batch, kv_heads, seq, dim = k.shape
    cache = PagedKVCache(
        batch, kv_heads, dim, page_size=page_size, dtype=k.dtype, device=k.device, capacity_tokens=seq * batch,
        super_page=super_page,
    )  # fmt: skip
    for start in range(0, seq, PREFILL_CHUNK):
        cache.append(k[:, :, start : start + PREFILL_CHUNK], v[:, :, start : start + PREFILL_CHUNK])
    channels = torch.arange(max(1, dim // 16), device=k.device).expand(kv_heads, -1).contiguous()
    cache.set_label_channels(channels)
    return cache


def _sdpa(choice, q_rows, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(choice):
        return F.scaled_dot_product_attention(q_rows, k, v)


def graphed(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream, which also autotune
    and compile): returns the graph's ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def error_line(error: Exception) -> str:
    """A failure as one short line for a row's ``errors``."""
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def measure(fn, device, *, graph: bool = False) -> tuple[float | None, str | None]:
    """``(median ms, None)`` of ``fn`` (``graph``: of its CUDA-graph replay), or ``(None, error
    line)`` when it fails. ``do_bench`` with 60 ms of repetitions: a decode step takes 0.01-1 ms,
    so that is still 60 or more samples, and the grid fits in its time box."""
    import triton.testing

    try:
        run = graphed(fn) if graph else fn
        return float(triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")), None
    except Exception as error:
        return None, error_line(error)


def kernel_us(fn, calls: int = 20) -> tuple[float | None, str | None]:
    """``(mean GPU kernel time per call in microseconds, None)`` of ``fn`` from the PyTorch
    profiler (every kernel, memset and copy it launches, summed; no launch gaps or graph replay
    overhead), or ``(None, error line)``. The first call (autotuning, compiles) is not profiled."""
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        return sum(event.self_device_time_total for event in prof.key_averages()) / calls, None
    except Exception as error:
        return None, error_line(error)


def dense_baselines(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache, device, *, graphs: bool
) -> dict:
    """Milliseconds (or errors) of each dense decode: cuDNN / flash SDPA, FlexAttention, our kernel."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.flex_attention import flex_attention

    batch = q.shape[0]
    q_rows = q.view(batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM)  # a group's heads as query rows
    flex = torch.compile(flex_attention, dynamic=False)
    selection = dense_selection(cache)
    runs = {
        "sdpa-cudnn": partial(_sdpa, SDPBackend.CUDNN_ATTENTION, q_rows, k, v),
        "sdpa-flash": partial(_sdpa, SDPBackend.FLASH_ATTENTION, q_rows, k, v),
        "flex": partial(flex, q[:, :, None], k, v, enable_gqa=True),
        "ours_dense": partial(_attend, q, cache, selection),
    }
    timings = {name: measure(run, device) for name, run in runs.items()}
    if graphs:  # eager timings of a few-microsecond step measure the host; graphed ones the GPU
        for name in ("sdpa-cudnn", "sdpa-flash", "ours_dense"):
            timings[f"{name}_graph"] = measure(runs[name], device, graph=True)
    return timings


def _attend(q, cache, selection):
    return paged_decode(
        q, cache.k_pages, cache.v_pages, cache.page_table, cache.seq_lens, selection.selected, selection.counts,
        select_block=selection.select_block,
    )  # fmt: skip


def _select(method, config, q, cache):
    return method.select(q, cache, config, layer=SPARSE_LAYER, state={"num_layers": 2 * SPARSE_LAYER})


def _step(method, config, q, cache):
    return _attend(q, cache, _select(method, config, q, cache))


def selection_bytes(name: str, cache: PagedKVCache, config) -> int:
    """Bytes a method's selection reads per step: Quest the pages' key min and max (two levels:
    every super-page's, then the kept super-pages' pages), Double Sparsity the label cache;
    streaming reads nothing."""
    summary = 2 * cache.head_dim * BYTES
    pages = sum(cache.num_pages()) * cache.kv_heads
    if name == "quest" and getattr(config, "levels", 1) == 2:
        from sparse_attn.decode.methods.quest import super_budget

        span = cache.super_page
        kept = super_budget(config, config.token_budget // cache.page_size, span)
        supers = [-(-n // span) for n in cache.num_pages()]
        fine = sum(min(n, min(kept, s) * span) for n, s in zip(cache.num_pages(), supers, strict=True))
        return (sum(supers) + fine) * cache.kv_heads * summary
    if name == "quest":
        return pages * summary
    if name == "double_sparsity":
        return pages * cache.page_size * cache.label_channels.shape[1] * BYTES
    if name == "retrieval":  # every centroid (keys' dtype) and its size and first member (int32, int64)
        index = cache.selection_memo[("retrieval", config)]
        return index.sizes.numel() * (cache.head_dim * BYTES + 4 + 8)
    return 0


def index_build_ms(method, config, q, cache) -> float:
    """``retrieval``: milliseconds to build a layer's index from scratch (k-means over the cache, the
    first step's selection; the better of two builds). The index left in the cache is the last one."""
    import time

    best = float("inf")
    for _ in range(2):
        cache.selection_memo.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        _select(method, config, q, cache)
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


def overlap(selection, reference) -> float:
    """Share of ``reference``'s selected entries that ``selection`` selects too."""
    same = total = 0
    for b in range(selection.counts.shape[0]):
        for h in range(selection.counts.shape[1]):
            mine = set(selection.selected[b, h, : int(selection.counts[b, h])].tolist())
            theirs = set(reference.selected[b, h, : int(reference.counts[b, h])].tolist())
            same, total = same + len(mine & theirs), total + len(theirs)
    return same / max(total, 1)


def time_runs(row: dict, timings: dict, device, *, graphs: bool) -> None:
    """Each of ``timings``' median ms into ``row[key + "_ms"]`` and, with ``graphs``, its CUDA-graph
    replay's into ``row[key + "_graph_ms"]``; failures into ``row["errors"]``."""
    for suffix, graph in (("", False), ("_graph", True)):
        if graph and not graphs:
            continue
        for key, run in timings.items():
            row[f"{key}{suffix}_ms"], error = measure(run, device, graph=graph)
            if error:
                row["errors"][f"{key}{suffix}"] = error


def sparse_row(
    name: str, budget: int, q, cache, dense: dict, peak_tbps: float, device, *, graphs: bool, levels: int = 1,
    kernel_times: bool = True,
) -> dict:  # fmt: skip
    """One method at one budget: selection, attention and step times (eager and graphed), bytes read and floors."""
    method = get_decode_method(name)
    options = {"token_budget": budget, **({"levels": levels} if name == "quest" else {})}
    if name == "quest" and levels == 2:
        options["oversample"] = OVERSAMPLE[0]
    config = method.make_config(**options)
    row = {"method": name, "budget": budget, "page_size": cache.page_size, "errors": {}}
    if name == "quest":
        row["levels"] = levels
    try:
        if name == "retrieval":
            row["index_build_ms"] = index_build_ms(method, config, q, cache)
        if name in ("quest", "retrieval") and RESELECT_EVERY[0] > 1:
            reuse_times(row, method, method.make_config(**options, reselect_every=RESELECT_EVERY[0]), q, cache, device,
                        graphs=graphs, kernel_times=kernel_times)  # fmt: skip
        selection = _select(method, config, q, cache)
    except Exception as error:  # a method that cannot run this shape is reported, not fatal
        row["errors"]["select"] = error_line(error)
        return row
    timings = {
        "select": partial(_select, method, config, q, cache),
        "attend": partial(_attend, q, cache, selection),
        "step": partial(_step, method, config, q, cache),
    }
    time_runs(row, timings, device, graphs=graphs)
    for suffix in ("", "_graph"):
        parts = [row.get(f"{key}{suffix}_ms") for key in timings]
        if all(parts):
            row[f"other{suffix}_ms"] = parts[2] - parts[0] - parts[1]
            row[f"select_share{suffix}"] = parts[0] / parts[2]
    if kernel_times:
        for key in ("select", "attend"):
            row[f"{key}_kernel_us"], error = kernel_us(timings[key])
            if error:
                row["errors"][f"{key}_kernel"] = error
        if row.get("select_kernel_us") is not None and row.get("attend_kernel_us"):
            row["select_share_kernel"] = row["select_kernel_us"] / (row["select_kernel_us"] + row["attend_kernel_us"])
    if name == "quest" and levels == 2:
        one_level = _select(method, method.make_config(token_budget=budget), q, cache)
        row["same_as_1_level"] = overlap(selection, one_level)
        row["super_page"] = cache.super_page
    tokens = selection.tokens_read().clamp(max=cache.seq_lens.long()[:, None])
    row["tokens_read"] = float(tokens.float().mean())
    row["attend_bytes"] = int(tokens.sum()) * cache.head_dim * 2 * BYTES
    row["select_bytes"] = selection_bytes(name, cache, config)
    row["attend_floor_ms"] = row["attend_bytes"] / (peak_tbps * 1e9)
    row["step_floor_ms"] = (row["attend_bytes"] + row["select_bytes"]) / (peak_tbps * 1e9)
    cudnn = dense.get("sdpa-cudnn_ms")
    if row.get("step_ms") and cudnn:
        row["step_vs_cudnn"] = row["step_ms"] / cudnn
    if row.get("step_graph_ms") and cudnn:
        row["step_graph_vs_cudnn"] = row["step_graph_ms"] / cudnn
    if row.get("step_graph_ms") and dense.get("sdpa-cudnn_graph_ms"):
        row["step_graph_vs_cudnn_graph"] = row["step_graph_ms"] / dense["sdpa-cudnn_graph_ms"]
    amortize(row)
    if row.get("step_graph_amortized_ms") and dense.get("sdpa-cudnn_graph_ms"):
        row["step_graph_amortized_vs_cudnn_graph"] = row["step_graph_amortized_ms"] / dense["sdpa-cudnn_graph_ms"]
    return row


def reuse_times(row: dict, method, config, q, cache, device, *, graphs: bool, kernel_times: bool) -> None:
    """Quest or retrieval with ``reselect_every`` R: a reuse step's selection (Quest: the
    remembered pages plus those opened since, one small kernel; retrieval: the remembered members
    placed after the static tokens) and step, and the step averaged over R steps (one selecting
    step and R - 1 reusing ones), eager, graphed and by kernel time."""
    from sparse_attn.decode.methods.quest import SelectionMemo, quest_pages

    steps = config.reselect_every
    row["reselect_every"] = steps
    if method.name == "quest":
        reuse = partial(SelectionMemo.remember(quest_pages(q, cache, config), cache, steps).reuse, cache)
    else:  # retrieval: the first call searches and remembers; later calls at these lengths reuse
        _select(method, config, q, cache)
        reuse = partial(_select, method, config, q, cache)
    time_runs(row, {"reuse": reuse, "reuse_step": lambda: _attend(q, cache, reuse())}, device, graphs=graphs)
    if kernel_times:
        row["reuse_kernel_us"], error = kernel_us(reuse)
        if error:
            row["errors"]["reuse_kernel"] = error


def amortize(row: dict) -> None:
    """Averages over ``reselect_every`` steps of a row timed with :func:`reuse_times`."""
    steps = row.get("reselect_every")
    if not steps:
        return
    for suffix in ("", "_graph"):
        select_step, reuse_step = row.get(f"step{suffix}_ms"), row.get(f"reuse_step{suffix}_ms")
        if select_step and reuse_step:
            row[f"step{suffix}_amortized_ms"] = (select_step + (steps - 1) * reuse_step) / steps
    select, reuse, attend = (row.get(f"{key}_kernel_us") for key in ("select", "reuse", "attend"))
    if select is not None and reuse is not None and attend:
        row["select_amortized_kernel_us"] = (select + (steps - 1) * reuse) / steps
        row["select_share_kernel_amortized"] = row["select_amortized_kernel_us"] / (
            row["select_amortized_kernel_us"] + attend
        )


def run_config(
    seq: int, batch: int, budgets, methods, page_sizes, peak_tbps: float, device, *, graphs: bool,
    levels=(1,), super_page: int = 16, kernel_times: bool = True,
) -> list[dict]:  # fmt: skip
    """Every row of one (context, batch): dense baselines, then each page size x method x budget."""
    need = 2 * seq * batch * KV_HEADS * HEAD_DIM * 2 * BYTES  # contiguous K/V + the pages
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.8 * free:
        print(f"skip {seq} x batch {batch}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free", flush=True)
        return []
    generator = torch.Generator(device=device).manual_seed(seq + batch)
    k, v = (
        torch.randn(batch, KV_HEADS, seq, HEAD_DIM, device=device, dtype=DTYPE, generator=generator) for _ in range(2)
    )
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device=device, dtype=DTYPE, generator=generator)
    rows = []
    base = {"seq": seq, "batch": batch}
    dense = {}
    for page_size in page_sizes:
        cache = build_cache(k, v, page_size, super_page)
        if not dense:
            for name, (ms, error) in dense_baselines(q, k, v, cache, device, graphs=graphs).items():
                dense[f"{name}_ms"] = ms
                if error:
                    dense.setdefault("errors", {})[name] = error
            dense_bytes = seq * batch * KV_HEADS * HEAD_DIM * 2 * BYTES
            dense["dense_floor_ms"] = dense_bytes / (peak_tbps * 1e9)
            rows.append({**base, "method": "dense", "page_size": page_size, **dense})
            print(format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
        for name in methods:
            for level in levels if name == "quest" else (1,):
                for budget in budgets:
                    row = sparse_row(
                        name, budget, q, cache, dense, peak_tbps, device, graphs=graphs, levels=level,
                        kernel_times=kernel_times,
                    )  # fmt: skip
                    rows.append({**base, **row})
                    print(format_table([rows[-1]], COLUMNS).splitlines()[-1], flush=True)
        del cache
        torch.cuda.empty_cache()
    return rows


COLUMNS = [
    ("seq", "seq", "d"),
    ("batch", "batch", "d"),
    ("page_size", "page", "d"),
    ("method", "method", ""),
    ("levels", "levels", "d"),
    ("budget", "budget", "d"),
    ("sdpa-cudnn_ms", "cuDNN ms", ".4f"),
    ("sdpa-flash_ms", "flash ms", ".4f"),
    ("flex_ms", "flex ms", ".4f"),
    ("ours_dense_ms", "ours dense ms", ".4f"),
    ("dense_floor_ms", "dense floor ms", ".4f"),
    ("select_ms", "select ms", ".4f"),
    ("attend_ms", "attend ms", ".4f"),
    ("other_ms", "other ms", ".4f"),
    ("step_ms", "step ms", ".4f"),
    ("step_floor_ms", "step floor ms", ".4f"),
    ("step_vs_cudnn", "step / cuDNN", ".3f"),
    ("select_share", "select / step", ".2f"),
    ("sdpa-cudnn_graph_ms", "cuDNN graph ms", ".4f"),
    ("sdpa-flash_graph_ms", "flash graph ms", ".4f"),
    ("ours_dense_graph_ms", "ours dense graph ms", ".4f"),
    ("select_graph_ms", "select graph ms", ".4f"),
    ("attend_graph_ms", "attend graph ms", ".4f"),
    ("other_graph_ms", "other graph ms", ".4f"),
    ("step_graph_ms", "step graph ms", ".4f"),
    ("step_graph_vs_cudnn", "graph step / cuDNN", ".3f"),
    ("step_graph_vs_cudnn_graph", "graph step / cuDNN graph", ".3f"),
    ("select_share_graph", "graph select / step", ".2f"),
    ("reselect_every", "reselect every", "d"),
    ("step_graph_amortized_ms", "graph step, amortized ms", ".4f"),
    ("step_graph_amortized_vs_cudnn_graph", "amortized / cuDNN graph", ".3f"),
    ("select_share_kernel_amortized", "select share, amortized kernels", ".2f"),
    ("select_kernel_us", "select kernels us", ".1f"),
    ("attend_kernel_us", "attend kernels us", ".1f"),
    ("select_share_kernel", "kernel select / (select + attend)", ".2f"),
    ("same_as_1_level", "same as 1 level", ".2f"),
    ("tokens_read", "tokens read", ".0f"),
    ("index_build_ms", "index build ms", ".1f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--methods", nargs="+", default=["quest", "double_sparsity", "streaming"])
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument(
        "--page-config", type=int, nargs=3, default=[131072, 8, 2048], metavar=("SEQ", "BATCH", "BUDGET")
    )
    parser.add_argument("--peak-tbps", type=float, default=4.8, help="HBM bandwidth for the floor (H200: 4.8)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2], help="quest's selection levels to time")
    parser.add_argument("--super-page", type=int, default=16, help="pages per super-page of two-level quest")
    parser.add_argument("--oversample", type=int, default=2, help="two-level quest's oversample option")
    parser.add_argument(
        "--reselect-every",
        type=int,
        default=1,
        help="quest's and retrieval's reselect_every: also time reuse steps and average",
    )
    parser.add_argument("--quick", action="store_true", help="32K and 128K, batch 8, budget 2048, quest, page 16")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument("--no-kernel-times", action="store_true", help="skip the profiler's kernel times")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    OVERSAMPLE[0] = args.oversample
    RESELECT_EVERY[0] = args.reselect_every
    device = torch.device("cuda")
    if args.quick:
        args.lengths, args.batches, args.budgets, args.methods, args.page_sizes = (
            [32768, 131072],
            [8],
            [2048],
            ["quest"],
            [16],
        )
    print(format_table([], COLUMNS), flush=True)
    rows = []
    page_seq, page_batch, page_budget = args.page_config
    for seq in args.lengths:
        for batch in args.batches:
            rows += run_config(
                seq, batch, args.budgets, args.methods, [16], args.peak_tbps, device, graphs=not args.no_graphs,
                levels=args.levels, super_page=args.super_page, kernel_times=not args.no_kernel_times,
            )  # fmt: skip
    if set(args.page_sizes) - {16}:
        sweep = sorted(set(args.page_sizes) - {16})
        rows += run_config(
            page_seq, page_batch, [page_budget], ["quest"], sweep, args.peak_tbps, device, graphs=not args.no_graphs,
            levels=args.levels, super_page=args.super_page, kernel_times=not args.no_kernel_times,
        )  # fmt: skip
    print()
    print(format_table(rows, COLUMNS))
    for row in rows:
        for name, error in row.get("errors", {}).items():
            print(f"  {row['seq']} b{row['batch']} {row['method']} {row.get('budget', '')}: {name}: {error}")
    path = args.output or Path(__file__).parent / "results" / device_slug(device) / "decode.json"
    meta = {"benchmark": "decode", "peak_tbps": args.peak_tbps, "shape": [Q_HEADS, KV_HEADS, HEAD_DIM, "bf16"]}
    meta["super_page"], meta["oversample"] = args.super_page, args.oversample
    meta["reselect_every"] = args.reselect_every
    write_results(rows, path, {**meta, **environment(device)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
