"""Compile operator kernels for sm_90a on any machine (no GPU needed) and print JSON.

    python triton_sm90_compile.py

For kernels that run on CUDA by default but whose CPU tests run under the interpreter (which
never compiles them): prints ``{name: {"returncode", "report", "ptx_has": {...}}}`` per kernel,
``report`` the last lines of ``ptxas -v``. Used by test_sm90_compile.py in a child process with
``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "backends"))
from gluon_sm90_compile import run_ptxas  # noqa: E402  (the Gluon compile script's ptxas step)


def compile_for_sm90(
    fn,
    signature: dict,
    constexprs: dict,
    num_warps: int = 4,
    *,
    num_stages: int = 3,
    ttgir: list | None = None,
) -> tuple[int, list[str], str]:
    """``(ptxas return code, its last two lines, PTX)``; ``ttgir``: a list the TTGIR is appended to."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = {name: "i32" for name in fn.arg_names}
    full.update(signature)
    full.update({name: "constexpr" for name in constexprs})
    # As a launch specializes them: pointers to 16-byte-aligned storage (every torch allocation),
    # and strides that are multiples of 16 elements (contiguous rows of head_dim 64-256). Without
    # these hints Triton cannot vectorize the loads and pipelines none of them.
    aligned = [name for name, kind in full.items() if kind.startswith("*") or name.startswith("stride_")]
    compiled = triton.compile(
        ASTSource(
            fn=fn,
            signature=full,
            constexprs=constexprs,
            attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned},
        ),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    if ttgir is not None:
        ttgir.append(compiled.asm["ttgir"])
    ptx = compiled.asm["ptx"]
    run = run_ptxas(ptx, check=False)
    return run.returncode, run.stderr.strip().splitlines()[-2:], ptx


def async_tile_copies(ttgir: str, head_dim: int) -> int:
    """How many asynchronous global-to-shared copies of ``(rows, head_dim)`` bf16 tiles the TTGIR
    holds: the Q/K/V/dO tile loads Triton's software pipelining took (``cp.async`` in the PTX
    also counts the small index and statistics loads)."""
    return sum(
        1
        for line in ttgir.splitlines()
        if "async_copy_global_to_local" in line and f"x{head_dim}xbf16" in line.split("->")[-1]
    )


def main() -> dict:
    import triton.language as tl

    from sparse_attn.ops.anchor_region import triton as anchor_region
    from sparse_attn.ops.antidiagonal import triton as antidiagonal
    from sparse_attn.ops.block_max import triton as block_max
    from sparse_attn.ops.causal_top_blocks import triton as causal_top_blocks
    from sparse_attn.ops.compressed_scores import triton as compressed_scores
    from sparse_attn.ops.gated_sum import triton as gated_sum
    from sparse_attn.ops.gathered_block_max import triton as gathered_block_max
    from sparse_attn.ops.lowbit import triton as lowbit
    from sparse_attn.ops.lowbit_block_margin import triton as lowbit_block_margin
    from sparse_attn.ops.mask_lists import triton as mask_lists
    from sparse_attn.ops.nsa_decode import triton as nsa_decode
    from sparse_attn.ops.residue_rows import triton as residue_rows
    from sparse_attn.ops.selection import triton as selection
    from sparse_attn.ops.vertical_slash_blocks import triton as vertical_slash_blocks

    rows = dict(HEAD_DIM=128, BLOCK_S=64, ROWS_PER_PROGRAM=2048, HAS_CENTER=True)
    # NSA's selection scores at its defaults (l = 32, d = 16, l' = 64) on a (64, 128) tile: 31 blocks.
    compressed = dict(HEAD_DIM=128, PIECES_PER_KEY=2, PIECES_PER_BLOCK=4, DOT_FP32=False, BLOCK_T=64, BLOCK_N=128)
    compressed.update(NS_EFF=31, NS=32)
    compressed_pointers = {"Q": "*bf16", "K": "*bf16", "Lse": "*fp32", "Out": "*fp32", "scale_log2": "fp32"}
    compressed_pointers.update({f"stride_{x}{y}": "i64" for x in "qko" for y in "bh"})
    scoring = dict(HEAD_DIM=128, STRIDE=8, QUERY_STEP=1, REDUCE_MAX=False, CELLS_PER_Q_BLOCK=16, CELLS_PER_KV_BLOCK=16)
    scoring.update(BLOCK_M=128, CAUSAL=True, DOT_FP32=False, PRECISION="tf32", USE_TMA=True, FAST_EXP2=True)
    scoring_pointers = {"RowBlockLse": "*fp32", "BlockProbs": "*fp32", "QScale": "*fp32", "KScale": "*fp32"}
    block_max_pointers = {"Positions": "*i64", "KeyScale": "*fp32", "KeyBias": "*fp32", "Out": "*fp32"}
    block_max_flags = dict(HAS_POSITIONS=True, HAS_SCALE=False, HAS_BIAS=False, BLOCK_N=128, COMPUTE=tl.bfloat16)
    gathered = dict(BLOCK_Q=128, BLOCK_K=128, BLOCK_N=64, DOT_FP32=False, PRECISION="tf32")
    gathered_pointers = {"Units": "*i64", "Present": "*u8", "Out": "*fp32", "QBlocks": "*i32"}
    region = dict(BLOCK_M=64, BLOCK_N=64, CAUSAL=True, DOT_FP32=False, PRECISION="tf32")
    region_pointers = {"RowMax": "*fp32", "RowLse": "*fp32", "scale": "fp32"}
    margin_pointers = {
        "QS": "*fp32",
        "Thr": "*fp32",
        "KS": "*fp32",
        "Bias": "*fp32",
        "Positions": "*i64",
        "Out": "*fp32",
    }
    margin = dict(BLOCK_M=128, BLOCK_N=128, DOT_FP32=False, HAS_POSITIONS=True, HAS_BIAS=True)
    margin_fp8 = dict(margin, CODES_FP8=True)
    margin = dict(margin, CODES_FP8=False)
    nsa_flags = dict(HEAD_DIM=128, BLOCK_G=16, DOT_FP32=False, PRECISION="tf32")
    nsa_parts = {"PartOut": "*fp32", "PartLse": "*fp32", "qk_scale": "fp32"}
    gates = {"Q": "*bf16", "A": "*bf16", "B": "*bf16", "C": "*bf16", "W": "*fp32", "Bias": "*fp32"}
    gate_rows = {name: "*fp32" for name in ("DotA", "DotB", "DotC", "LogA", "LogB", "LogC")}
    top_pointers = {"Scores": "*fp32", "Indices": "*i32", "Counts": "*i32"}
    gated_top_pointers = {"Q": "*bf16", "Keys": "*bf16", "Indices": "*i32", "Counts": "*i32"}
    cases = {
        # NSA's lists (top 16 of 1024 blocks: rounds) and a longer top-n (the bitonic top-k).
        "causal_top_blocks_rounds": (
            causal_top_blocks._top_blocks, top_pointers, dict(BLOCK_R=4, NB=1024, K_TILE=16), 4,
        ),
        "causal_top_blocks_topk": (
            causal_top_blocks._top_blocks, top_pointers, dict(BLOCK_R=8, NB=512, K_TILE=32), 4,
        ),
        # MoBA's gate at 512-token blocks of 128K (256 pooled keys), top 3.
        "causal_top_blocks_gated": (
            causal_top_blocks._top_blocks_gated, gated_top_pointers,
            dict(HEAD_DIM=128, BLOCK_R=16, SUB_TILES=16, NB=256, K_TILE=4, ROUNDS=2, DOT_FP32=False), 8,
        ),
        "gated_sum": (
            gated_sum._gated_sum, {**gates, "Out": "*bf16"},
            dict(HEAD_DIM=128, BLOCK_M=64, NUM_BRANCHES=3, NUM_GATES=3), 4,
        ),
        "gated_sum_backward": (
            gated_sum._gated_sum_backward,
            {**gates, **{name: "*bf16" for name in ("DOut", "DA", "DB", "DC", "DQ")}, "DLogits": "*fp32",
             "DWeight": "*fp32", **gate_rows},
            dict(HEAD_DIM=128, BLOCK_M=64, NUM_BRANCHES=2, NUM_GATES=3, FOLD=False), 4,
        ),
        "gated_sum_backward_folded": (  # the fused NSA backward's (nn.nsa_fused)
            gated_sum._gated_sum_backward,
            {**gates, **{name: "*bf16" for name in ("DOut", "DA", "DB", "DC", "DQ")}, "DLogits": "*fp32",
             "DWeight": "*fp32", **gate_rows},
            dict(HEAD_DIM=128, BLOCK_M=64, NUM_BRANCHES=3, NUM_GATES=3, FOLD=True), 4,
        ),
        "compressed_scores_pointers": (
            compressed_scores._compressed_scores, compressed_pointers, dict(compressed, USE_TMA=False), 4,
        ),
        "compressed_scores_tma": (
            compressed_scores._compressed_scores, compressed_pointers, dict(compressed, USE_TMA=True), 8,
        ),
        "residue_rows": (
            residue_rows._regroup, {"X": "*bf16", "Out": "*bf16", "fill": "fp32"},
            dict(HEAD_DIM=128, BLOCK_R=64, TO_RESIDUE=False), 4,
        ),
        "nsa_decode_compressed": (
            nsa_decode._compressed_split,
            {"Q": "*bf16", "KC": "*bf16", "VC": "*bf16", "Scores": "*fp32", **nsa_parts},
            dict(nsa_flags, BLOCK_N=64), 4,
        ),
        "nsa_decode_scores": (
            nsa_decode._score_blocks,
            {"Scores": "*fp32", "PartLse": "*fp32", "TokenSums": "*fp32", "Candidates": "*i64"},
            dict(BLOCK_G=16, SPLIT_TILE=32, SCORE_TILE=256, CHUNK_TILES=2, PIECES_PER_KEY=2, PIECES_PER_BLOCK=4,
                 K_TILE=16, MAX_CHUNKS=16), 4,
        ),
        "nsa_decode_attend": (
            nsa_decode._attend_split,
            {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Candidates": "*i64", **nsa_parts},
            dict(nsa_flags, BLOCK_N=64, SELECT_BLOCK=64, TILES_PER_BLOCK=1, K_TILE=16, MAX_CHUNKS=16,
                 HAS_WINDOW=True), 4,
        ),
        "nsa_decode_combine": (
            nsa_decode._combine,
            {"Q": "*bf16", "W": "*fp32", "Bias": "*fp32", "PartC": "*fp32", "LseC": "*fp32", "PartA": "*fp32",
             "LseA": "*fp32", "Out": "*bf16"},
            dict(HEAD_DIM=128, BLOCK_G=16, SPLIT_TILE=32, HAS_WINDOW=True), 4,
        ),
        "anchor_region_bf16": (
            anchor_region._region_stats, {"Q": "*bf16", "K": "*bf16", **region_pointers},
            dict(region, HEAD_DIM=128), 4,
        ),
        "anchor_region_d256": (
            anchor_region._region_stats, {"Q": "*fp16", "K": "*fp16", **region_pointers},
            dict(region, HEAD_DIM=256), 8,
        ),
        "gathered_block_max_bf16": (
            gathered_block_max._gathered_block_max, {"Q": "*bf16", "K": "*bf16", **gathered_pointers},
            dict(gathered, HEAD_DIM=128, BLOCK_D=128), 8,
        ),
        "gathered_block_max_d256": (
            gathered_block_max._gathered_block_max, {"Q": "*fp16", "K": "*fp16", **gathered_pointers},
            dict(gathered, HEAD_DIM=256, BLOCK_D=64), 8,
        ),
        "block_max_split": (
            block_max._block_max_kernel, {"Q": "*fp32", "K": "*bf16", **block_max_pointers},
            dict(block_max_flags, HEAD_DIM=128, BLOCK_M=64, MODE=2), 4,
        ),
        "block_max_d256": (
            block_max._block_max_kernel, {"Q": "*bf16", "K": "*bf16", **block_max_pointers},
            dict(block_max_flags, HEAD_DIM=256, BLOCK_M=64, MODE=1, HAS_BIAS=True, HAS_SCALE=True), 8,
        ),
        "lowbit_margin_int8": (
            lowbit_block_margin._margin_kernel, {"QC": "*i8", "KC": "*i8", **margin_pointers},
            dict(margin, HEAD_DIM=128), 4,
        ),
        "lowbit_margin_fp8_d256": (
            lowbit_block_margin._margin_kernel, {"QC": "*fp8e4nv", "KC": "*fp8e4nv", **margin_pointers},
            dict(margin_fp8, HEAD_DIM=256), 8,
        ),
        "mask_lists": (mask_lists._row_lists, {"Mask": "*u8", "Columns": "*i32"}, dict(BLOCK=1024), 4),
        "vertical_slash_blocks": (
            vertical_slash_blocks._crossed_blocks, {"VerticalPrefix": "*i32", "SlashPrefix": "*i32", "Out": "*i8"},
            dict(CAUSAL=True, BLOCK_J=256), 4,
        ),
        "lowbit_absmax": (
            lowbit._absmax_kernel, {"X": "*bf16", "Center": "*fp32", "Absmax": "*fp32"}, rows, 4,
        ),
        "lowbit_encode": (
            lowbit._encode_kernel,
            {"X": "*bf16", "Center": "*fp32", "Scale": "*fp32", "Codes": "*fp8e4nv"},
            dict(rows, HOST_CAST=False),
            4,
        ),
        "selection_mass": (
            selection._select_row, {"Scores": "*fp32", "KeepCount": "*fp32", "Out": "*u8", "threshold": "fp32"},
            dict(MASS=True, BLOCK=1024), 4,
        ),
        "antidiagonal_tma_bf16": (
            antidiagonal._cell_block_probs, {"Q": "*bf16", "K": "*bf16", **scoring_pointers, "qk_scale": "fp32"},
            dict(scoring, BLOCK_N=256, BLOCK_D=64, SCALED=False), 8,
        ),
        "antidiagonal_tma_fp8": (
            antidiagonal._cell_block_probs, {"Q": "*fp8e4nv", "K": "*fp8e4nv", **scoring_pointers, "qk_scale": "fp32"},
            dict(scoring, BLOCK_N=128, BLOCK_D=128, SCALED=True), 8,
        ),
    }  # fmt: skip
    results = {}
    for name, (fn, signature, constexprs, warps) in cases.items():
        returncode, report, ptx = compile_for_sm90(fn, signature, constexprs, warps)
        keys = ("cp.async.bulk.tensor", "cvt.rn.satfinite.e4m3x2.f32", "ex2.approx.f16x2", "wgmma")
        has = {key: key in ptx for key in keys}
        results[name] = {"returncode": returncode, "report": report, "ptx_has": has}
    return results


if __name__ == "__main__":
    print(json.dumps(main()))
