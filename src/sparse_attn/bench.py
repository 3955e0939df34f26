"""Kernel benchmark: block-sparse backends against dense attention measured in the same run.

Used by ``benchmarks/kernel_grid.py`` (the full GPU grid) and ``sparse-attn bench`` (``--quick``
runs small CPU sizes). Every time is a median: ``triton.testing.do_bench`` on CUDA, the
median of repeated wall-clock runs on CPU. Throughput counts only the query-key pairs a
pattern really computes (causal pairs inside kept blocks), at 4 * head_dim FLOPs per pair
(two matrix products).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from .api import block_sparse_attention
from .backends import kernel_configs, resolve_backend
from .pattern import BlockSparsePattern, dense_pattern, random_pattern


@dataclass
class KernelCase:
    """One benchmark shape (SDPA layout, the queries are the whole sequence; causal unless ``causal=False``)."""

    seq: int
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    batch: int = 1
    dtype: str = "bfloat16"
    block: int = 128
    densities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    causal: bool = True


def device_slug(device: torch.device) -> str:
    """A folder name for results: ``h100``, ``h200``, ``a100`` ... or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    match = re.search(r"\b([abhlt]\d{2,3})\b", name)
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def time_ms(fn: Callable[[], object], device: torch.device, *, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def visible_pairs(pattern: BlockSparsePattern, *, causal: bool = True) -> int:
    """Query-key pairs the pattern computes, summed over batch and pattern heads.

    Per block ``(i, j)`` the count of (query, key) pairs with the key inside the sequence
    and, when causal, not after the query; computed per query row offset so memory stays
    O(n_q_blocks * n_kv_blocks).
    """
    device = pattern.device
    offset = pattern.seq_k - pattern.seq_q
    key_start = torch.arange(pattern.num_kv_blocks, device=device) * pattern.block_k
    key_end = torch.clamp(key_start + pattern.block_k, max=pattern.seq_k)
    query_start = torch.arange(pattern.num_q_blocks, device=device) * pattern.block_q
    pairs = torch.zeros(pattern.num_q_blocks, pattern.num_kv_blocks, dtype=torch.int64, device=device)
    for row in range(pattern.block_q):
        query = query_start + row
        in_range = (query < pattern.seq_q)[:, None]
        if causal:
            seen = torch.clamp((query + offset)[:, None] + 1, min=key_start, max=key_end) - key_start
        else:
            seen = (key_end - key_start).expand(pattern.num_q_blocks, -1)
        pairs += torch.where(in_range, seen, 0)
    return int((pattern.to_mask().to(torch.int64) * pairs).sum())


def _tflops(pairs: int, head_dim: int, ms: float | None) -> float | None:
    return None if ms is None else 4.0 * head_dim * pairs / (ms * 1e-3) / 1e12


def dense_baselines(q, k, v, device, *, causal: bool = True) -> dict[str, Callable[[], object]]:
    """Dense SDPA per backend, causal unless ``causal=False`` (K/V expanded to the query heads, outside the timing)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if device.type == "cuda":
        choices = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
    else:
        choices = {"sdpa": None}

    def runner(choice):
        def run():
            if choice is None:
                return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=causal)
            with sdpa_kernel(choice):
                return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=causal)

        return run

    baselines = {name: runner(choice) for name, choice in choices.items()}
    fa4 = fa4_dense(q, k, v, causal=causal)
    if fa4 is not None:
        baselines["fa4-dense"] = fa4
    return baselines


def fa4_dense(q, k, v, *, causal: bool = True) -> Callable[[], object] | None:
    """FlashAttention-4's dense kernel called directly (its ``(B, S, H, D)`` layout made outside
    the timing; GQA native), or ``None`` where the flash4 backend's pieces are not installed."""
    from .backends import flash4

    if q.device.type != "cuda" or flash4.installed() is not None:
        return None
    from flash_attn.cute import flash_attn_func

    q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return partial(flash_attn_func, q_t, k_t, v_t, causal=causal)


def measure(fn, device) -> tuple[float | None, str | None]:
    """``(time_ms(fn), None)``, or ``(None, error line)`` when ``fn`` fails: a backend, method or
    configuration that cannot run a shape is reported, not fatal."""
    try:
        return time_ms(fn, device), None
    except Exception as error:
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def _resolved(backend: str, q, k, v, pattern: BlockSparsePattern, *, causal: bool = True) -> tuple[str, str | None]:
    """The backend that runs ``backend`` on this case, and why it is another one (``None`` when it
    is the one asked for, or when ``auto`` was asked for)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        name = resolve_backend(backend, q, k, v, pattern, causal=causal, return_lse=False)
    if backend in ("auto", name):
        return name, None
    reasons = "; ".join(str(warning.message) for warning in caught) or f"runs on the {name} backend"
    return name, f"fallback: {reasons}"


def backend_variant(spec: str) -> tuple[str, dict]:
    """``"auto+kv_streams_per_wave=0+gluon_persistent=false"`` -> the backend name and its
    :func:`~sparse_attn.backends.kernel_configs` overrides (integers and true/false parsed, other
    values kept as strings: ``auto+gluon_backward=dkdv``), so a benchmark can time one backend
    under several tuning choices side by side."""
    name, *settings = spec.split("+")
    overrides = {}
    for setting in settings:
        key, _, value = setting.partition("=")
        lowered = value.lower()
        if lowered in ("true", "false"):
            overrides[key] = lowered == "true"
        else:
            overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, overrides


def run_kernel_case(case: KernelCase, backends: tuple[str, ...], device: torch.device, seed: int = 0) -> list[dict]:
    """Time each backend on random patterns at each density (causal or not, as ``case.causal``), and dense SDPA once.

    One row per density: the backends' times on the same pattern, the dense SDPA times,
    the throughput of the first backend over the pairs it computes, and its speedup over
    the first dense baseline. A backend that fails on a shape, or would fall back to another
    (see :mod:`sparse_attn.backends`), gets ``None`` and the error or the fallback's reason;
    ``auto`` columns also name the backend they ran (``auto_backend``, ``auto+...``'s ``auto+..._backend``).
    Kernel tuning choices are swept with :func:`sparse_attn.backends.kernel_configs` around the call,
    or per column with a backend variant (:func:`backend_variant`: ``"gluon+gluon_persistent=false"``).
    """
    dtype = getattr(torch, case.dtype)
    generator = torch.Generator(device=device).manual_seed(seed)

    def draw(heads):
        return torch.randn(case.batch, heads, case.seq, case.head_dim, device=device, dtype=dtype, generator=generator)

    q, k, v = draw(case.q_heads), draw(case.kv_heads), draw(case.kv_heads)
    causal = case.causal
    full = dense_pattern(seq_q=case.seq, block_q=case.block, block_k=case.block, causal=causal, device=device)
    dense_times, errors = {}, {}
    for name, fn in dense_baselines(q, k, v, device, causal=causal).items():
        dense_times[name], errors[name] = measure(fn, device)
    dense_name = next(iter(dense_times))
    dense_pairs = visible_pairs(full, causal=causal) * case.batch * case.q_heads
    rows = []
    for density in case.densities:
        pattern = (
            full
            if density >= 1.0
            else random_pattern(
                heads=case.kv_heads,
                seq_q=case.seq,
                density=density,
                seed=seed,
                block_q=case.block,
                block_k=case.block,
                causal=causal,
                device=device,
            )
        )
        pairs = visible_pairs(pattern, causal=causal) * case.batch * (case.q_heads // pattern.num_heads)
        row = {
            "seq": case.seq,
            "head_dim": case.head_dim,
            "q_heads": case.q_heads,
            "kv_heads": case.kv_heads,
            "dtype": case.dtype,
            "block": case.block,
            "causal": causal,
            "density": round(pattern.density(causal=causal), 4),
            "pair_fraction": round(pairs / dense_pairs, 4),
        }
        for backend in backends:
            name, overrides = backend_variant(backend)
            with kernel_configs(**overrides):
                _, fallback = _resolved(name, q, k, v, pattern, causal=causal)
                if fallback is not None:  # timing another backend under this name would mislead
                    row[f"{backend}_ms"], errors[backend] = None, fallback
                    continue
                run = partial(block_sparse_attention, q, k, v, pattern, causal=causal, backend=name)
                row[f"{backend}_ms"], errors[backend] = measure(run, device)
                if name == "auto":  # what the timed (repeated) calls ran: auto may move a shape on its second call
                    row[f"{backend}_backend"] = _resolved(name, q, k, v, pattern, causal=causal)[0]
        for name, ms in dense_times.items():
            row[f"{name}_ms"] = ms
            row[f"{name}_tflops"] = _tflops(dense_pairs, case.head_dim, ms)
        ours = row[f"{backends[0]}_ms"]
        row[f"{backends[0]}_tflops"] = _tflops(pairs, case.head_dim, ours)
        for backend in backends:
            mine, base = row[f"{backend}_ms"], dense_times[dense_name]
            row[f"{backend}_speedup_vs_{dense_name}"] = None if mine is None or base is None else base / mine
        row["errors"] = {name: error for name, error in errors.items() if error}
        rows.append(row)
    return rows


def kernel_columns(backends: tuple[str, ...], dense_names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Table columns for :func:`run_kernel_case` rows: times, throughput, speedups vs the first dense baseline."""
    first, dense = backends[0], dense_names[0]
    columns = [("seq", "seq", "d"), ("head_dim", "dim", "d"), ("density", "density", ".3f")]
    columns += [(f"{name}_ms", f"{name} ms", ".2f") for name in backends + dense_names]
    columns += [(f"{first}_tflops", f"{first} TFLOP/s", ".3g"), (f"{dense}_tflops", f"{dense} TFLOP/s", ".3g")]
    columns += [(f"{name}_speedup_vs_{dense}", f"{name} vs {dense}", ".2f") for name in backends]
    return columns


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    """``||out - reference|| / ||reference||`` (Frobenius) in float32."""
    return float(torch.linalg.vector_norm((out - reference).float()) / torch.linalg.vector_norm(reference.float()))


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are ``(key, header, format spec)``, missing values print ``-``."""
    texts = [[format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns] for row in rows]
    widths = [max([len(header), 8] + [len(cells[i]) for cells in texts]) for i, (_, header, _) in enumerate(columns)]
    lines = ["  ".join(f"{header:>{width}}" for (_, header, _), width in zip(columns, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(f"{text:>{width}}" for text, width in zip(cells, widths, strict=True)) for cells in texts]
    return "\n".join(lines)


def add_waves_argument(parser) -> None:
    """``--kv-streams-per-wave``: the kernels' launch order for a benchmark run (see
    :func:`sparse_attn.backends.launch.heads_per_wave`); pass the parsed value to
    ``kernel_configs(kv_streams_per_wave=...)`` and :func:`waves_label` to the JSON's meta."""
    parser.add_argument(
        "--kv-streams-per-wave",
        type=int,
        default=None,
        help="launch order of our kernels: (batch, KV head) streams per wave (0: one wave; default: "
        "as many as fill half the L2 cache)",
    )


def waves_label(value: int | None) -> int | str:
    return "auto" if value is None else value


def write_results(rows: list[dict], path: Path, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def _check_correlation(correlation) -> float:
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not 0 <= correlation < 1:
        raise ValueError(f"correlation must be a number in [0, 1), got {correlation!r}")
    return float(correlation)


def _ar1_along(x: torch.Tensor, rho: float, chunk: int) -> torch.Tensor:
    """Float32 white noise ``x`` through the stationary AR(1) filter along dimension ``-2`` (see
    :func:`smooth_sequence`): one ``chunk x chunk`` lower-triangular product per chunk and one
    carry per chunk, never a loop over tokens. ``x`` is modified."""
    seq = x.shape[-2]
    c = (1.0 - rho * rho) ** 0.5
    x[..., 0, :] /= c  # so that y[0] = x[0]: stationary from the first token
    padded = -(-seq // chunk) * chunk
    x = torch.nn.functional.pad(x, (0, 0, 0, padded - seq)).unflatten(-2, (padded // chunk, chunk))
    steps = torch.arange(chunk, device=x.device, dtype=torch.float32)
    lag = steps[:, None] - steps[None, :]
    weights = torch.where(lag >= 0, rho ** lag.clamp(min=0), torch.zeros((), device=x.device)) * c
    y = weights @ x  # each chunk as if it started from zero
    decay = (rho ** (steps + 1))[:, None]  # what the previous chunk's last value adds to each step
    for index in range(1, y.shape[-3]):
        y[..., index, :, :] += decay * y[..., index - 1, -1:, :]
    return y.flatten(-3, -2)[..., :seq, :]


def smooth_sequence(
    shape: tuple[int, ...],
    correlation: float,
    *,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    chunk: int = 128,
) -> torch.Tensor:
    """Standard-normal entries correlated along the sequence (dimension ``-2``): an AR(1) process
    ``y[t] = c * y[t - 1] + sqrt(1 - c**2) * x[t]`` of white noise ``x``, started stationary
    (``y[0] = x[0]``), so every entry has variance 1 and entries ``s`` positions apart correlation
    ``c**s``. ``correlation`` 0 is ``torch.randn`` in ``dtype``.

    Benchmark inputs whose neighbouring tokens look alike, as in real text (random inputs make
    every token's top-k choice independent of its neighbour's). Computed in float32 chunk by
    chunk (one ``chunk x chunk`` lower-triangular product per chunk, one carry per chunk), so it
    costs O(S * chunk) per row, never a loop over tokens."""
    if len(shape) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"shape must be at least two positive ints (..., seq, dim), got {shape!r}")
    options = dict(generator=generator, device=device, dtype=dtype, chunk=chunk)
    return smooth_grid(tuple(shape[:-2]), (shape[-2],), shape[-1], correlation, **options)


def smooth_grid(
    leading: tuple[int, ...],
    grid: tuple[int, ...],
    dim: int,
    correlation: float,
    *,
    generator: torch.Generator | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    chunk: int = 128,
) -> torch.Tensor:
    """``(*leading, prod(grid), dim)`` standard-normal entries, the tokens of a ``grid`` (a video's
    ``(T, H, W)`` or an image's ``(H, W)``) in raster order, correlated along every grid
    dimension: :func:`smooth_sequence`'s AR(1) filter applied along each in turn, so two tokens
    ``(dt, dh, dw)`` apart have correlation ``c ** (|dt| + |dh| + |dw|)`` and every entry variance
    1. Benchmark inputs with the local spatio-temporal likeness of video latents."""
    rho = _check_correlation(correlation)
    if not grid or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid):
        raise ValueError(f"grid must be positive ints, got {grid!r}")
    seq = math.prod(grid)
    if rho == 0.0:  # the same draw as torch.randn in that dtype
        return torch.randn((*leading, seq, dim), generator=generator, device=device, dtype=dtype)
    x = torch.randn((*leading, *grid, dim), generator=generator, device=device, dtype=torch.float32)
    for axis in range(len(grid)):
        position = len(leading) + axis
        x = _ar1_along(x.movedim(position, -2).contiguous(), rho, chunk).movedim(-2, position)
    return x.reshape(*leading, seq, dim).to(dtype)
