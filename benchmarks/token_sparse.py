"""Token-level selection (MoBA, NSA's selected branch) on the token-granular kernel vs dense and FlexAttention (GPU).

Batch 1, bf16, causal, the queries are the whole sequence; at 8K / 32K / 64K / 128K tokens:

* ``moba-4096x12`` and ``moba-512x3``: the ``moba`` method at the paper's long-context setting
  (block 4096, top-k 12) and its scaling-law setting (block 512, top-k 3), 32 query / 8 KV heads,
  head_dim 128 (the project's default shape), lists per query head as the paper gates; and
  ``moba-4096x12-group``, the same with ``share_in_group=True`` (one list per KV head);
  ``moba-64x16``, small blocks (64, top 16, lists per query head; not a paper setting), which
  the tile path ran 3x slower than dense cuDNN forward + backward at 32K on white noise
  (43rd session, ``results/h100/moba64x16_ab_32k_s63.json``) and which takes the gathered path
  since the 44th session (``--moba-path tile`` for the tile path).
* ``nsa-module``: :class:`sparse_attn.nn.NativeSparseAttention` at the paper's defaults and shape,
  all three branches and the selection, forward and forward + backward (parameters included):
  the compressed branch on the block kernels (queries regrouped by residue, a dense causal
  pattern), the selection scores by :mod:`sparse_attn.ops.compressed_scores`, the selected branch
  on the token-granular kernel, the sliding window on the block kernels with a box predicate
  (no FlexAttention column: the time includes the module's own estimate).
* ``nsa-module-fla-config``: the same module at fla-core's NSA configuration (compression by mean
  pooling over blocks of 64, no sliding window), beside fla-core's own NSA (``fla`` columns);
  ``nsa-module-fla-config-g32`` with 64 query / 2 KV heads (a group of 32).
* ``nsa-select``: NSA's selected-attention branch alone at NSA's shape, 64 query / 4 KV heads,
  head_dim 128, per token and KV group 16 blocks of 64 keys: the token's own block plus 15
  earlier blocks drawn at random (a stand-in for the compressed branch's scores; the first and
  local blocks NSA always adds are not forced, so no block is listed by every token).

Per case, medians of ``triton.testing.do_bench`` (``sparse_attn.bench.time_ms``) of the
forward (under ``no_grad``) and of forward + backward (``out.backward(dout)``, gradients for q,
k and v) of: ``ours`` (``backend="triton"``, which runs the token-granular kernel), FlexAttention
on the same selection (a ``BlockMask`` of 128 x 128 blocks, every one partial, the union of
its tokens' selections, with a ``mask_mod`` that looks the token's selection up in a dense
``(B, H, S, n_blocks)`` table: FlexAttention's finest query block is its kernel tile, so the
token rule must go through ``mask_mod``), and dense SDPA with cuDNN and with FlashAttention
on K/V expanded to the query heads (expansion outside the timing). The estimate (``moba``'s
gate and top-k) is timed separately and excluded from the attention times. The BlockMask
build and the pattern's plan are outside the timings too.

``fla``: flash-linear-attention's NSA (the registry package ``fla-core``, pure Triton; imported
if installed, e.g. ``pip install --no-deps --target DIR fla-core==0.6.0``), a baseline only: its
selected-attention kernel on the same lists for ``nsa-select`` (``fla_max_abs_diff``: the largest
difference of its output from ours), its whole NSA for ``nsa-module-fla-config``.

``density``: the causal (query, key) pairs the selection computes over all causal pairs (for
``nsa-module``, its selected branch's). ``x cuDNN`` / ``x flex``: their time over ours.

A case that fails (out of memory, a backend that refuses) is reported in ``errors`` and the run
goes on; a case that has used up ``--case-budget`` seconds skips its remaining measurements, and
cases not started when the run has used ``--budget`` seconds (default 170: the whole run stays
near 3 minutes) are listed as skipped. Cases run in priority order: the issue's targets first
(``nsa-select`` at 64K, ``moba-4096x12`` and ``moba-512x3`` at 128K, ``nsa-module`` at 64K), then by length. ``--budget 1200`` runs the whole
grid (FlexAttention compiles once per shape, tens of seconds each).
Writes ``benchmarks/results/<gpu>/token_sparse.json``. ``--token-rows 32|64|128`` packs more query
tokens per token-kernel program (NSA's 16-head group: 2, 4 or 8 tokens per tile; at 32 the
paper-default module's selected branch took 55.6 ms at 64K instead of 27.3 with 16 rows:
``results/h200/token_sparse_nsa_module_rows32.json``). Inputs are white noise, so neighbouring
tokens choose independently; ``--correlation 0.98`` draws q and k correlated along the sequence
(``sparse_attn.bench.smooth_sequence``), which makes NSA's neighbouring tokens share their
selected blocks about as much as SmolLM2's do on text (``benchmarks/selection_overlap.py``).

    PYTHONPATH=$PWD/src python benchmarks/token_sparse.py            # the full grid
    PYTHONPATH=$PWD/src python benchmarks/token_sparse.py --quick    # 8K and 32K, two cases
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.backends.configs import kernel_configs
from sparse_attn.bench import device_slug, environment, format_table, measure, smooth_sequence, write_results
from sparse_attn.nn import NativeSparseAttention

# fla-core's NSA configuration: mean-pooled compression over blocks of 64, no sliding window.
FLA_NSA = dict(
    kind="nsa-module",
    q_heads=64,
    kv_heads=4,
    block=64,
    top_k=16,
    module=dict(compress_block=64, compress_stride=64, compressor="mean", window=0),
    fla=True,
)
CASES = {
    "moba-4096x12": dict(kind="moba", q_heads=32, kv_heads=8, block=4096, top_k=12, share_in_group=False),
    "moba-4096x12-group": dict(kind="moba", q_heads=32, kv_heads=8, block=4096, top_k=12, share_in_group=True),
    "moba-512x3": dict(kind="moba", q_heads=32, kv_heads=8, block=512, top_k=3, share_in_group=False),
    "moba-64x16": dict(kind="moba", q_heads=32, kv_heads=8, block=64, top_k=16, share_in_group=False),
    "nsa-select": dict(kind="nsa", q_heads=64, kv_heads=4, block=64, top_k=16, fla=True),
    "nsa-module": dict(kind="nsa-module", q_heads=64, kv_heads=4, block=64, top_k=16),
    "nsa-module-fla-config": FLA_NSA,
    # The same with a GQA group of 32 (64 query / 2 KV heads): fla-core takes power-of-two groups >= 16.
    "nsa-module-fla-config-g32": {**FLA_NSA, "kv_heads": 2},
}
QUICK_CASES = ("moba-4096x12", "nsa-select")
HEAD_DIM = 128
FLEX_BLOCK = 128


def nsa_like_pattern(kv_heads: int, seq: int, block: int, selected: int, seed: int, device) -> sa.BlockSparsePattern:
    """Per token and KV head: its own block and ``selected - 1`` earlier blocks at random (all
    earlier blocks where there are fewer), ``block_q = 1``. Built in chunks of tokens, so the
    random scores held at once are ``(kv_heads, chunk, n_blocks)``."""
    n_blocks = -(-seq // block)
    generator = torch.Generator(device=device).manual_seed(seed)
    columns = torch.arange(n_blocks, device=device)
    counts = torch.empty((1, kv_heads, seq), dtype=torch.int32, device=device)
    indices = torch.empty((1, kv_heads, seq, selected), dtype=torch.int32, device=device)
    chunk = max(1, (1 << 26) // (kv_heads * n_blocks))
    for start in range(0, seq, chunk):
        own = (torch.arange(start, min(start + chunk, seq), device=device) // block)[:, None]
        scores = torch.rand((kv_heads, own.shape[0], n_blocks), generator=generator, device=device)
        scores = torch.where(columns < own, scores, -1.0)
        scores = torch.where(columns == own, 2.0, scores)
        top = scores.topk(min(selected, n_blocks), dim=-1)
        kept = torch.where(top.values >= 0, top.indices, n_blocks)  # past-the-end: not kept
        kept = torch.sort(kept, dim=-1).values
        if kept.shape[-1] < selected:
            kept = torch.nn.functional.pad(kept, (0, selected - kept.shape[-1]), value=n_blocks)
        counts[0, :, start : start + own.shape[0]] = (kept < n_blocks).sum(-1, dtype=torch.int32)
        indices[0, :, start : start + own.shape[0]] = torch.where(kept < n_blocks, kept, 0).to(torch.int32)
    return sa.BlockSparsePattern(
        kv_counts=counts, kv_indices=indices, block_q=1, block_k=block, seq_q=seq, seq_k=seq
    ).validate(causal=True)


def token_density(pattern: sa.BlockSparsePattern) -> float:
    """Causal (query, key) pairs a ``block_q = 1`` pattern computes over all causal pairs, from its
    lists (O(kept entries); ``sparse_attn.bench.visible_pairs`` builds an O(S x blocks) table)."""
    used = torch.arange(pattern.max_kv, device=pattern.device) < pattern.kv_counts[..., None]
    position = torch.arange(pattern.seq_q, device=pattern.device)[:, None] + (pattern.seq_k - pattern.seq_q)
    start = pattern.kv_indices.long() * pattern.block_k
    seen = (torch.minimum(start + pattern.block_k, position + 1) - start).clamp(min=0)
    causal_pairs = pattern.seq_q * (pattern.seq_k - pattern.seq_q) + pattern.seq_q * (pattern.seq_q + 1) // 2
    return float((seen * used).sum()) / (causal_pairs * pattern.batch * pattern.num_heads)


def flex_selection(pattern: sa.BlockSparsePattern, q_heads: int):
    """``(block_mask, table)``: FlexAttention's ``BlockMask`` for a ``block_q = 1`` pattern (see the
    module docstring) and the ``(B, H, S, n_blocks)`` bool selection table its ``mask_mod`` reads."""
    from torch.nn.attention.flex_attention import BlockMask

    table = pattern.to_mask()  # (B, H, S, n_blocks): block_q = 1, so one row per token
    batch, heads, seq, n_blocks = table.shape
    block, group = pattern.block_k, q_heads // heads
    n_q, n_kv = -(-seq // FLEX_BLOCK), -(-seq // FLEX_BLOCK)
    rows = torch.nn.functional.pad(table, (0, 0, 0, n_q * FLEX_BLOCK - seq)).view(batch, heads, n_q, FLEX_BLOCK, -1)
    coarse = rows.any(3)  # (B, H, n_q, n_blocks): a 128-query block keeps what any of its tokens keeps
    if block >= FLEX_BLOCK:  # each 128-key block lies in one selection block
        coarse = coarse.repeat_interleave(block // FLEX_BLOCK, -1)[..., :n_kv]
    else:  # each 128-key block holds FLEX_BLOCK // block selection blocks
        per = FLEX_BLOCK // block
        coarse = torch.nn.functional.pad(coarse, (0, n_kv * per - n_blocks)).view(batch, heads, n_q, n_kv, per).any(-1)
    coarse = coarse.repeat_interleave(group, 1)
    counts = coarse.sum(-1, dtype=torch.int32)
    indices = torch.sort((~coarse).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & table[b, h // group, q_idx, kv_idx // block]

    block_mask = BlockMask.from_kv_blocks(
        counts, indices, BLOCK_SIZE=(FLEX_BLOCK, FLEX_BLOCK), mask_mod=mask_mod, seq_lengths=(seq, seq)
    )
    return block_mask, table


def fla_twin(spec: dict, pattern: sa.BlockSparsePattern, q: torch.Tensor):
    """``(fn, None)``: flash-linear-attention's NSA (``fla-core``, pure Triton; a benchmark baseline
    only, imported if installed) on our ``(B, H, S, D)`` tensors, or ``(None, why)``.

    ``nsa``: its selected-attention kernel on our pattern's block lists (same selection, same
    outputs). ``nsa-module``: its whole NSA at its own configuration (compression by mean pooling
    over blocks of ``block``, selection of ``top_k`` blocks from the compressed scores, gates 1/2,
    no sliding window: fla runs that branch through flash-attn), against our module at the same
    configuration. The layout change to fla's ``(B, S, H, D)`` is inside the timing (ours takes
    ``(B, H, S, D)``)."""
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as error:  # noqa: BLE001 - reported, the run goes on
        return None, f"fla-core not importable: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    if spec["kind"] == "nsa":
        indices = pattern.kv_indices.permute(0, 2, 1, 3).long().contiguous()  # (B, S, Hkv, n)
        counts = pattern.kv_counts.permute(0, 2, 1).long().contiguous()  # (B, S, Hkv)

        def selected(q, k, v):
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            out = parallel_nsa(q, k, v, block_indices=indices, block_counts=counts, block_size=spec["block"])
            return out.transpose(1, 2)

        return selected, None
    gates = torch.full(q.shape[:3], 0.5, device=q.device, dtype=q.dtype).transpose(1, 2).contiguous()

    def whole(q, k, v):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        out = parallel_nsa(q, k, v, g_cmp=gates, g_slc=gates, block_counts=spec["top_k"], block_size=spec["block"])
        return out.transpose(1, 2)

    return whole, None


def _sdpa(choice, q, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(choice):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _forward_backward(attention, q, k, v, dout):
    attention(q, k, v).backward(dout)
    q.grad = k.grad = v.grad = None


def _forward(attention, q, k, v):
    with torch.no_grad():
        return attention(q, k, v)


class Budget:
    """Seconds left to one case: measurements after it is spent are skipped (reported)."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def measure(self, fn, device) -> tuple[float | None, str | None]:
        if time.perf_counter() > self.deadline:
            return None, "skipped: case budget spent"
        return measure(fn, device)


def dense_times(seq: int, q_heads: int, kv_heads: int, device, budget: Budget) -> dict:
    """Dense causal SDPA (cuDNN, flash) forward and forward + backward at this shape."""
    from torch.nn.attention import SDPBackend

    generator = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(1, q_heads, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
    k, v = (
        torch.randn(1, q_heads, seq, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)
        for _ in range(2)
    )
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    times, errors = {}, {}
    choices = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    if device.type != "cuda":
        choices = {"cudnn": SDPBackend.MATH}  # a CPU smoke run has neither: the math kernel stands in
    for name, choice in choices.items():
        attention = partial(_sdpa, choice)
        runs = {
            "fwd": partial(_forward, attention, q, k, v),
            "fwdbwd": partial(_forward_backward, attention, q, k, v, dout),
        }
        for mode, run in runs.items():
            times[f"{name}_{mode}_ms"], error = budget.measure(run, device)
            if error:
                errors[f"{name}_{mode}"] = error
    return {**times, "errors": errors}


def nsa_parts(module: NativeSparseAttention, q, k, v, device, budget: Budget) -> dict:
    """Forward ms of each step of the NSA module (no gradient): compression, compressed branch,
    selection, selected branch, window branch (its pattern from ``window_pattern``, as in the module;
    cached per shape since the fifth session's runs, which rebuilt it inside the timing), and the
    gated sum of the branches (``ops.gated_sum``; since the twenty-first session)."""
    from sparse_attn.nn.nsa import window_pattern
    from sparse_attn.ops.gated_sum import gated_sum

    scale = q.shape[-1] ** -0.5
    seq_k = k.shape[2]
    with torch.no_grad():
        k_cmp, v_cmp, _ = module.compressed_tokens(k, v)
        _, lse = module.compressed_branch(q, k_cmp, v_cmp, seq_k, scale)
        pattern = module.selection(q, k_cmp, lse, seq_k, scale)
    steps = {
        "compress": lambda: module.compressed_tokens(k, v),
        "compressed_branch": lambda: module.compressed_branch(q, k_cmp, v_cmp, seq_k, scale),
        "selection": lambda: module.selection(q, k_cmp, lse, seq_k, scale),
        "selected_branch": lambda: module.selected_branch(q, k, v, pattern, scale),
    }
    if module.window:
        steps["window_branch"] = lambda: sa.block_sparse_attention(
            q, k, v, window_pattern(q.shape[2], seq_k, module.window, device=q.device), scale=scale
        )
    with torch.no_grad():
        branches = [step() for name, step in steps.items() if name.endswith("_branch") and name != "compressed_branch"]
        branches.insert(0, module.compressed_branch(q, k_cmp, v_cmp, seq_k, scale)[0])
    steps["gated_sum"] = lambda: gated_sum(q, branches, module.gate_weight, module.gate_bias)

    def run(step):
        with torch.no_grad():
            return step()

    return {name: budget.measure(partial(run, step), device)[0] for name, step in steps.items()}


def run_case(
    name: str,
    seq: int,
    device,
    *,
    budget_s: float,
    flex: bool,
    fla: bool = True,
    parts: bool = False,
    seed: int = 0,
    correlation: float = 0.0,
) -> dict:
    spec = CASES[name]
    budget = Budget(budget_s)
    q_heads, kv_heads = spec["q_heads"], spec["kv_heads"]
    generator = torch.Generator(device=device).manual_seed(seed)
    # q and k correlated along the sequence with --correlation (v stays white noise).
    q, k, v = (
        smooth_sequence((1, heads, seq, HEAD_DIM), rho, generator=generator, device=device, dtype=torch.bfloat16)
        for heads, rho in ((q_heads, correlation), (kv_heads, correlation), (kv_heads, 0.0))
    )
    row = {"case": name, "seq": seq, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": HEAD_DIM, "errors": {}}
    row["correlation"] = correlation
    row.update(block=spec["block"], top_k=spec["top_k"])
    start = time.perf_counter()
    if spec["kind"] == "moba":
        options = dict(block_size=spec["block"], top_k=spec["top_k"], share_in_group=spec["share_in_group"])
        estimate = partial(sa.estimate, q, k, "moba", **options)
        pattern = estimate()
        row["estimate_ms"], _ = budget.measure(estimate, device)
    elif spec["kind"] == "nsa-module":
        options = spec.get("module", {})
        module = NativeSparseAttention(HEAD_DIM, q_heads, kv_heads, **options)
        module = module.to(device, torch.bfloat16)
        pattern = module.selected_pattern(q, k, v)
    else:
        pattern = nsa_like_pattern(kv_heads, seq, spec["block"], spec["top_k"], seed, device)
    row["pattern_heads"] = pattern.num_heads
    row["density"] = token_density(pattern)
    row["setup_s"] = time.perf_counter() - start
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)

    attention = {"ours": partial(sa.block_sparse_attention, pattern=pattern, backend="triton")}
    if spec["kind"] == "nsa-module":  # the whole module (its estimate included); no FlexAttention twin
        attention = {"ours": module}
    if fla and spec.get("fla"):
        twin, error = fla_twin(spec, pattern, q)
        if twin is not None:
            attention["fla"] = twin
        else:
            row["errors"]["fla"] = error
    if spec["kind"] != "nsa-module" and flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            block_mask, _table = flex_selection(pattern, q_heads)
            compiled = torch.compile(flex_attention, dynamic=False)
            attention["flex"] = partial(compiled, block_mask=block_mask, enable_gqa=True)
            n_blocks = block_mask.kv_num_blocks.shape[-1]  # 128-blocks kept over causal 128-blocks
            row["flex_block_density"] = float(block_mask.kv_num_blocks.float().mean()) / ((n_blocks + 1) / 2)
        except Exception as error:  # noqa: BLE001 - reported, the run goes on
            row["errors"]["flex"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if "fla" in attention and spec["kind"] == "nsa":  # same selection: the outputs must agree
        with torch.no_grad():
            ours, theirs = attention["ours"](q, k, v).float(), attention["fla"](q, k, v).float()
            row["fla_max_abs_diff"] = float((ours - theirs).abs().max())
    if spec["kind"] == "nsa-module" and parts:
        row["parts_fwd_ms"] = nsa_parts(module, q, k, v, device, budget)
    for label, fn in attention.items():
        runs = {"fwd": partial(_forward, fn, q, k, v), "fwdbwd": partial(_forward_backward, fn, q, k, v, dout)}
        for mode, run in runs.items():
            row[f"{label}_{mode}_ms"], error = budget.measure(run, device)
            if error:
                row["errors"][f"{label}_{mode}"] = error
    return row


def _columns() -> list[tuple[str, str, str]]:
    columns = [("case", "case", "s"), ("seq", "seq", "d"), ("density", "density", ".4f")]
    for mode, label in (("fwd", "fwd"), ("fwdbwd", "fwd+bwd")):
        names = ("ours", "flex", "fla", "cudnn", "flash")
        columns += [(f"{name}_{mode}_ms", f"{name} {label} ms", ".2f") for name in names]
        columns += [(f"speedup_vs_{other}_{mode}", f"x {other} {label}", ".2f") for other in ("cudnn", "flex", "fla")]
    columns += [("estimate_ms", "estimate ms", ".2f")]
    return columns


def _speedups(row: dict) -> None:
    for mode in ("fwd", "fwdbwd"):
        ours = row.get(f"ours_{mode}_ms")
        for other in ("cudnn", "flex", "fla"):
            theirs = row.get(f"{other}_{mode}_ms")
            row[f"speedup_vs_{other}_{mode}"] = theirs / ours if ours and theirs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--quick", action="store_true", help=f"8K and 32K, cases {', '.join(QUICK_CASES)}")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    parser.add_argument("--no-fla", action="store_true", help="skip fla-core's NSA (measured when importable)")
    parser.add_argument("--parts", action="store_true", help="nsa-module cases: also time each step of the module")
    parser.add_argument("--case-budget", type=float, default=40.0, help="seconds per case before skipping the rest")
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for the run; later cases are skipped")
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs tiny --lengths under TRITON_INTERPRET=1")
    parser.add_argument(
        "--moba-path",
        choices=("auto", "tile", "gathered"),
        default="auto",
        help="token kernel path: auto (triton_tokens_gathered.uses_gathered_path), or forced "
        "(kernel_configs(token_path=...))",
    )
    parser.add_argument(
        "--token-rows",
        type=lambda value: value if value == "overlap" else int(value),
        choices=(16, 32, 64, 128, "overlap"),
        default=None,
        help="rows per token-kernel program (kernel_configs(token_rows=...); default 16: one token of NSA's group,"
        " and for nsa-module the module's own default, overlap: 64 where the lists of four neighbours overlap"
        " enough, else 16)",
    )
    parser.add_argument(
        "--token-gather-rows",
        type=int,
        choices=(64, 128),
        default=None,
        help="rows per program of the gathered path (MoBA's large blocks; kernel_configs(token_gather_rows=...))",
    )
    parser.add_argument(
        "--dkdv-skip-early",
        choices=("on", "off"),
        default=None,
        help="causal token dK/dV: skip listing steps before the keys by a branch (on) or run them masked (off)",
    )
    parser.add_argument(
        "--token-wide-steps",
        choices=("branch", "masked", "zeroed_v"),
        default=None,
        help="tiles of several tokens: a branch per key step, or branch-free steps (kernel_configs(token_wide_steps=...))",
    )
    parser.add_argument(
        "--correlation",
        type=float,
        default=0.0,
        help="q and k correlated along the sequence (sparse_attn.bench.smooth_sequence; 0: white noise, "
        "0.98: NSA's neighbouring tokens share blocks about as on SmolLM2 with text, benchmarks/selection_overlap.py)",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    from sparse_attn.backends import triton_tokens, triton_tokens_backward

    if args.dkdv_skip_early is not None:
        triton_tokens_backward.DKDV_SKIP_EARLY = args.dkdv_skip_early == "on"
    lengths, cases = (args.lengths, args.cases) if not args.quick else ([8192, 32768], list(QUICK_CASES))
    columns = _columns()
    path = args.output or Path(__file__).parent / "results" / device_slug(device) / "token_sparse.json"
    meta = {
        "benchmark": "token_sparse",
        "quick": args.quick,
        "moba_path": args.moba_path,
        "token_rows": args.token_rows,  # None: the defaults (16; the NSA module's own, "overlap")
        "correlation": args.correlation,
        "token_wide_steps": args.token_wide_steps
        or ("zeroed_v" if args.token_rows == "overlap" else triton_tokens.WIDE_STEPS_BY_DEFAULT),
        "token_gather_rows": args.token_gather_rows or 64,
        "dkdv_skip_early": triton_tokens_backward.DKDV_SKIP_EARLY,
        **environment(device),
    }
    print(format_table([], columns), flush=True)
    rows, dense_cache, skipped = [], {}, []
    deadline = time.perf_counter() + args.budget
    targets = [(65536, "nsa-select"), (131072, "moba-4096x12"), (131072, "moba-512x3"), (65536, "nsa-module")]
    grid = [(seq, name) for seq in lengths for name in cases]
    for seq, name in [pair for pair in targets if pair in grid] + [pair for pair in grid if pair not in targets]:
        if time.perf_counter() > deadline:
            skipped.append(f"{name} {seq}")
            continue
        configs = dict(
            token_rows=args.token_rows, token_gather_rows=args.token_gather_rows, token_wide_steps=args.token_wide_steps,
            token_path=None if args.moba_path == "auto" else args.moba_path,
        )  # fmt: skip
        chosen = []  # token_rows="overlap": the query blocks per tile each pattern took
        choose = triton_tokens.overlap_tile_blocks

        def recorded(*args, chosen=chosen, choose=choose):
            chosen.append(choose(*args))
            return chosen[-1]

        triton_tokens.overlap_tile_blocks = recorded
        try:
            with kernel_configs(**configs):
                row = run_case(
                    name, seq, device, budget_s=args.case_budget, flex=not args.no_flex, fla=not args.no_fla,
                    parts=args.parts, correlation=args.correlation,
                )  # fmt: skip
        finally:
            triton_tokens.overlap_tile_blocks = choose
        row["token_rows"] = args.token_rows or (
            NativeSparseAttention.DEFAULT_TOKEN_ROWS if CASES[name]["kind"] == "nsa-module" else 16
        )
        if chosen:
            row["overlap_tile_blocks"] = sorted(set(chosen))
        shape = (seq, row["q_heads"], row["kv_heads"])
        if shape not in dense_cache:
            dense_cache[shape] = dense_times(*shape, device, Budget(args.case_budget))
        dense = dense_cache[shape]
        row.update({key: value for key, value in dense.items() if key != "errors"})
        row["errors"].update(dense["errors"])
        _speedups(row)
        rows.append(row)
        print(format_table([row], columns).splitlines()[-1], flush=True)
        for what, error in row["errors"].items():
            print(f"  {row['case']} {row['seq']}: {what}: {error}", flush=True)
        if row.get("parts_fwd_ms"):
            steps = ", ".join(f"{step} {ms:.2f}" for step, ms in row["parts_fwd_ms"].items() if ms is not None)
            print(f"  {row['case']} {row['seq']}: forward ms by step: {steps}", flush=True)
        write_results(rows, path, meta)  # after every case: a run cut short keeps what it measured
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows.sort(key=lambda row: (list(CASES).index(row["case"]), row["seq"]))
    print()
    print(format_table(rows, columns))
    if skipped:
        print(f"skipped (run budget of {args.budget:.0f} s spent): {', '.join(skipped)}")
    for row in rows:
        for what, error in row["errors"].items():
            print(f"  {row['case']} {row['seq']}: {what}: {error}")
    meta["skipped"] = skipped
    write_results(rows, path, meta)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
