"""The ``sparse-attn`` command line: ``eval`` (tasks x methods x lengths on a real model), ``show``
(one layer's block mask as a PNG), ``bench`` (kernels vs dense) and ``methods`` (the registry)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _bench(args: argparse.Namespace) -> int:
    from .bench import (
        KernelCase,
        device_slug,
        environment,
        format_table,
        kernel_columns,
        run_kernel_case,
        write_results,
    )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        backends, dense = ("triton", "flex"), ("sdpa-cudnn", "sdpa-flash")
        lengths = args.lengths or ([4096, 16384] if args.quick else [8192, 32768, 65536, 131072])
        case = dict(q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", block=128)
    else:
        # CPU: the compiled FlexAttention path against the reference, at sizes a laptop runs in seconds.
        backends, dense = ("flex", "reference"), ("sdpa",)
        lengths = args.lengths or ([1024, 2048] if args.quick else [1024, 2048, 4096, 8192])
        case = dict(q_heads=8, kv_heads=2, head_dim=64, dtype="float32", block=128)
    densities = tuple(args.densities or ((0.1, 0.3, 1.0) if args.quick else (0.05, 0.1, 0.2, 0.5, 1.0)))
    print(
        f"sparse-attn bench on {device} ({'quick' if args.quick else 'full'}): batch 1, "
        f"{case['q_heads']}/{case['kv_heads']} heads, head_dim {case['head_dim']}, {case['dtype']}, causal, "
        f"random block patterns of {case['block']}; medians in ms",
        flush=True,
    )
    start = time.perf_counter()
    rows = []
    for number, seq in enumerate(lengths, 1):
        print(
            f"[{number}/{len(lengths)}] seq {seq}: {', '.join(dense + backends)} at densities "
            f"{', '.join(map(str, densities))} ...",
            end=" ",
            flush=True,
        )
        case_start = time.perf_counter()
        rows += run_kernel_case(KernelCase(seq=seq, densities=densities, **case), backends, device)
        print(f"{time.perf_counter() - case_start:.0f} s", flush=True)
    print(format_table(rows, _bench_columns(kernel_columns(backends, dense), dense[0])))
    print(f"x faster = {dense[0]} ms / the backend's ms at the same length (above 1: faster than dense {dense[0]})")
    for row in rows:
        if row["errors"]:
            print(f"  seq {row['seq']} density {row['density']}: {row['errors']}")
    seconds = time.perf_counter() - start
    if args.out is None:
        print(
            f"done in {seconds:.0f} s; nothing was saved: add --out FILE.json to write these rows as JSON "
            f"(the repository keeps its runs in benchmarks/results/{device_slug(device)}/)"
        )
    else:
        write_results(rows, args.out, {"benchmark": "kernels", **environment(device)})
        print(f"done in {seconds:.0f} s; wrote the rows to {args.out.resolve()}")
    return 0


def _bench_columns(columns: list[tuple[str, str, str]], dense: str) -> list[tuple[str, str, str]]:
    """The benchmark's table columns with the speedup headers saying which way the ratio goes."""
    speedup_suffix = f"_speedup_vs_{dense}"
    return [
        (key, f"{header} (x faster)" if key.endswith(speedup_suffix) else header, spec) for key, header, spec in columns
    ]


def _methods(args: argparse.Namespace) -> int:
    from .decode import list_decode_methods
    from .registry import list_methods

    for kind, methods in (("", list_methods()), (" (decode)", list_decode_methods())):
        for method in methods:
            defaults = ", ".join(f"{name}={value!r}" for name, value in method.defaults().items()) or "no options"
            print(f"{method.name}{kind}\n    {method.summary}\n    paper: {method.paper}\n    defaults: {defaults}")
    return 0


# The CPU --quick grid: one length, two depths, one seed, the dense ceiling and three methods
# whose defaults are sparse at 2K (dynamic, static, and random as the floor): a grid a 2-core
# machine finishes in minutes (the measured time is in the eval epilog and the README).
QUICK_LENGTHS = [2048]
QUICK_DEPTHS = [0.25, 0.75]
QUICK_METHODS = ["xattention", "strided_shards", "random"]
DEFAULT_TASKS = ["passkey", "niah"]
DEFAULT_LENGTHS = [2048, 4096]
DEFAULT_DEPTHS = [0.1, 0.3, 0.5, 0.7, 0.9]
_QUICK_CASES = len(DEFAULT_TASKS) * len(QUICK_LENGTHS) * len(QUICK_DEPTHS) * (1 + len(QUICK_METHODS))
DEFAULT_OUT = Path("sparse-attn-results")
DEFAULT_MODEL = "gemma3-270m"
# The shell's exit status for a command ended by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130


def _fail(command: str, message: str) -> int:
    print(f"sparse-attn {command}: error: {message}", file=sys.stderr)
    return 2


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 is what the Triton path runs on GPUs; on the CPU float32 keeps the exact dequantized weights.
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def _load_checked(name: str, lengths: list[int], *, dtype, device):
    """``models.load``, then a ``ValueError`` when a length exceeds the model's context limit."""
    from .models import load

    model, tokenizer = load(name, dtype=dtype, device=device)
    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = [length for length in lengths if limit is not None and length > limit]
    if too_long:
        raise ValueError(
            f"lengths {too_long} exceed the model's limit of {limit} tokens (config.max_position_embeddings)"
        )
    return model, tokenizer


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .eval.grid import MethodVariant, build_grid
    from .eval.report import summarize, tables, write_report
    from .eval.runner import Runner
    from .eval.tasks import get_task
    from .registry import list_methods

    device, dtype = _device_and_dtype(args)
    quick = args.quick and device.type == "cpu"
    # seer needs gates trained for the model (shipped for smollm2-135m): asked for by name only.
    every_causal = [method.name for method in list_methods() if not method.bidirectional and method.name != "seer"]
    method_texts = args.methods or (QUICK_METHODS if quick else every_causal)
    lengths = args.lengths or (QUICK_LENGTHS if quick else DEFAULT_LENGTHS)
    depths = args.depths or (QUICK_DEPTHS if quick else DEFAULT_DEPTHS)
    if any(length < 1 for length in lengths) or any(not 0.0 <= depth <= 1.0 for depth in depths):
        return _fail("eval", "lengths must be positive and depths within [0, 1]")
    try:
        variants = [MethodVariant.parse(text) for text in method_texts + (args.method_options or [])]
        tasks = {name: get_task(name, haystack_source=args.haystack) for name in args.tasks or DEFAULT_TASKS}
        cases = build_grid(list(tasks), variants, lengths, depths, args.seeds)
    except ValueError as error:
        return _fail("eval", str(error))

    console = Console()
    results_path = args.out / "results.jsonl"
    console.print(
        f"sparse-attn eval ({'quick' if quick else 'full'}) on {device}: {args.model}, tasks {list(tasks)}, "
        f"lengths {lengths}, depths {depths}, seeds {args.seeds}; {len(cases)} cases "
        f"({len({case.variant for case in cases})} method variants, dense included); "
        f"results go to {results_path.resolve()}",
        soft_wrap=True,  # a path is printed whole, never folded over lines
    )
    start = time.perf_counter()
    runner, finished_before = None, 0
    try:
        try:
            model, tokenizer = _load_checked(args.model, lengths, dtype=dtype, device=device)
            runner = Runner(
                model,
                tokenizer,
                model_name=args.model,
                tasks=tasks,
                results_path=results_path,
                backend=args.backend,
                warmup=not args.no_warmup,
            )
            finished_before = len(cases) - len(runner.pending(cases))
            runner.prepare(cases)
        except (ValueError, ImportError) as error:
            return _fail("eval", str(error))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            rows = runner.run(cases, progress=progress)
    except KeyboardInterrupt:
        finished = len(cases) - len(runner.pending(cases)) if runner is not None else finished_before
        this_run = finished - finished_before
        print(
            f"sparse-attn eval: interrupted after {this_run} case{'' if this_run == 1 else 's'} "
            f"({finished} of {len(cases)} are in {results_path}); rerun the same command to resume",
            file=sys.stderr,
        )
        return INTERRUPTED
    _print_tables(console, tables(summarize(rows), model=args.model))
    for path in write_report(rows, args.out, model=args.model):
        console.print(f"wrote {path.resolve()}", soft_wrap=True)
    console.print(f"results: {results_path.resolve()} ({time.perf_counter() - start:.0f} s)", soft_wrap=True)
    return 0


def _print_tables(console, tables) -> None:
    """Print rich tables whole: in a terminal at its width; in a log or pipe as wide as each table needs.

    (Off a terminal rich assumes 80 columns and would cut a many-length table's cells to "…".)
    """
    from rich.console import Console
    from rich.measure import Measurement

    for table in tables:
        if console.is_terminal:
            console.print(table)
            continue
        width = Measurement.get(console, console.options.update_width(10_000), table).maximum
        Console(file=console.file, width=max(console.width, width)).print(table)


def _show(args: argparse.Namespace) -> int:
    from .eval.grid import MethodVariant
    from .eval.show import full_attention_layers, show_block_mask
    from .eval.tasks import get_task

    device, dtype = _device_and_dtype(args)
    try:
        variant = MethodVariant.parse(args.method)
        task = get_task(args.task, haystack_source=args.haystack)
    except ValueError as error:
        return _fail("show", str(error))
    try:
        model, tokenizer = _load_checked(args.model, [args.length], dtype=dtype, device=device)
    except (ValueError, ImportError) as error:
        return _fail("show", str(error))
    layer = args.layer if args.layer is not None else full_attention_layers(model)[0]
    if not 0 <= layer < model.config.num_hidden_layers:
        return _fail("show", f"layer {layer} is out of range: the model has {model.config.num_hidden_layers} layers")
    sample = task.make(tokenizer, args.length, args.depth if task.uses_depth else None, args.seed)
    path = args.out or DEFAULT_OUT / f"mask_{variant.name}_layer{layer}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    shown = show_block_mask(model, sample, variant, layer, path, model_name=args.model, block_size=args.block_size)
    print(
        f"{variant.label}, layer {layer}: {shown['heads']} pattern head(s), "
        f"density {shown['density']:.3f}; wrote {path.resolve()}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attn", description="Block-sparse attention for long-context prefill.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="time block-sparse backends against dense attention",
        description=(
            "Time the block-sparse backends on random causal block patterns at several densities against dense "
            "SDPA measured in the same run (on CUDA: triton and flex vs cuDNN and flash SDPA, batch 1, 32/8 heads, "
            "head_dim 128, bf16; on CPU: flex and reference vs SDPA, 8/2 heads, head_dim 64, float32). Prints one "
            "line per length as it goes, then a table of median milliseconds, throughput and each backend's speedup "
            "over dense ('x faster' = dense ms / backend ms). Nothing is saved unless --out is given."
        ),
    )
    bench.add_argument("--quick", action="store_true", help="a small grid: two lengths, three densities")
    bench.add_argument("--lengths", type=int, nargs="+", help="sequence lengths")
    bench.add_argument("--densities", type=float, nargs="+", help="pattern densities (1.0 = dense)")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--out", type=Path, help="also write the rows as JSON to this file")
    bench.set_defaults(run=_bench)
    methods = commands.add_parser("methods", help="list the registered methods with their papers and defaults")
    methods.set_defaults(run=_methods)
    _add_eval_parser(commands)
    _add_show_parser(commands)
    return parser


_VARIANT_HELP = "NAME or NAME:OPTION=VALUE[,OPTION=VALUE...], e.g. xattention:threshold=0.8 (see `sparse-attn methods`)"


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"gemma3-270m, smollm2-135m, a model directory or a .gguf file (default {DEFAULT_MODEL})",
    )
    command.add_argument(
        "--haystack",
        choices=["pydoc", "kjv", "essays"],
        help="text of the needle tasks and perplexity (default: pydoc for needles, kjv for perplexity)",
    )
    command.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    command.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (default: bfloat16 on cuda, float32 on cpu)",
    )


def _add_eval_parser(commands) -> None:
    from .eval.tasks import TASK_NAMES

    command = commands.add_parser(
        "eval",
        help="score methods on long-context tasks with a real model: table, JSON and plots",
        description=(
            "Run tasks x methods x lengths x depths x seeds on a causal LM patched with each method "
            "(dense is always included as the ceiling). Each finished case is appended to OUT/results.jsonl; "
            "a rerun with the same OUT skips finished cases (same model, task, haystack, method variant, length, "
            "depth and seed: delete the file to measure again). Writes OUT/summary.json, OUT/frontier.png and "
            "OUT/needle_<task>.png and prints a table per task."
        ),
        epilog=(
            f"--quick on a CPU runs {DEFAULT_TASKS} at {QUICK_LENGTHS} tokens, depths {QUICK_DEPTHS}, seed 0, "
            f"methods dense + {QUICK_METHODS}: {_QUICK_CASES} cases, measured at 3 min 24 s wall time on a 2-core x86 CPU "
            "(model already converted, other jobs sharing the cores). With CUDA it runs the full default grid. "
            "Explicit options override the grid's parts. Prefill times are warm (each case's prefill runs once "
            "untimed first, unless --no-warmup); Ctrl-C stops a run, and rerunning the same command resumes it."
        ),
    )
    _add_model_arguments(command)
    command.add_argument("--tasks", nargs="+", metavar="TASK", help=f"of {list(TASK_NAMES)} (default {DEFAULT_TASKS})")
    # "extend": a flag given twice adds to the list instead of replacing it.
    command.add_argument(
        "--methods",
        nargs="+",
        action="extend",
        metavar="METHOD",
        help=f"method variants, each {_VARIANT_HELP} (default: every registered method)",
    )
    command.add_argument(
        "--method-options",
        nargs="+",
        action="extend",
        metavar="METHOD",
        help="extra variants, same syntax, run in addition to --methods (or to every registered method), "
        "e.g. --method-options xattention:threshold=0.8 flexprefill:gamma=0.8",
    )
    command.add_argument(
        "--lengths", type=int, nargs="+", metavar="TOKENS", help=f"prompt lengths in tokens (default {DEFAULT_LENGTHS})"
    )
    command.add_argument(
        "--depths",
        type=float,
        nargs="+",
        metavar="FRACTION",
        help=f"needle depths in [0, 1] (default {DEFAULT_DEPTHS})",
    )
    command.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="sample seeds (default 0)")
    command.add_argument(
        "--backend", default="auto", help="block-sparse backend: auto, reference, flex, triton or gluon (default auto)"
    )
    command.add_argument("--quick", action="store_true", help="a small grid for a CPU (see below)")
    command.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip each case's untimed warm-up prefill (about half the time on a CPU; scores are the same, "
        "timings are then first calls and the report shows no speedup)",
    )
    command.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default ./{DEFAULT_OUT})")
    command.set_defaults(run=_eval)


def _add_show_parser(commands) -> None:
    from .eval.tasks import TASK_NAMES

    command = commands.add_parser(
        "show",
        help="plot the block mask a method picks for one layer on a real prompt (PNG)",
        description=(
            "Capture one layer's queries and keys on a task prompt, run the method's estimator and plot "
            "the mask per head; the needle's key block is marked in red."
        ),
    )
    _add_model_arguments(command)
    command.add_argument(
        "--method", default="xattention", help=f"the method variant, {_VARIANT_HELP} (default xattention)"
    )
    command.add_argument("--task", default="niah", choices=TASK_NAMES, help="the prompt's task (default niah)")
    command.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default 4096)")
    command.add_argument("--depth", type=float, default=0.5, help="needle depth (default 0.5)")
    command.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    command.add_argument("--layer", type=int, help="layer index (default: the first full-attention layer)")
    command.add_argument("--block-size", type=int, default=128, help="block size of the pattern (default 128)")
    command.add_argument("--out", type=Path, help=f"PNG path (default ./{DEFAULT_OUT}/mask_<method>_layer<N>.png)")
    command.set_defaults(run=_show)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        # eval says how far it got itself; the other commands have nothing to resume.
        print(f"sparse-attn {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
