"""Peak memory of building a pattern streamed by heads: padded table (widened per head) vs compact pieces (CPU).

A causal pattern of ``--heads`` heads x ``--blocks`` x ``--blocks`` blocks is added one head at a
time, each head denser than the last (so its lists are wider and a padded table must widen). Each
mode runs in its own process; the peak resident-set growth during the build is printed beside the
final table's size. Usage: ``python benchmarks/pattern_builder_memory.py [--heads 16] [--blocks 4096]``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch

from sparse_attn.ops.to_pattern import PatternBuilder


def build(heads: int, blocks: int, compact: bool) -> str:
    torch.manual_seed(0)
    builder = PatternBuilder(
        batch=1, heads=heads, seq_q=blocks * 128, seq_k=blocks * 128, block_q=128, block_k=128, causal=True,
        compact=compact,
    )  # fmt: skip
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for head in range(heads):
        mask = torch.rand(1, 1, blocks, blocks) < 0.4 + 0.6 * (head + 1) / heads
        builder.add(mask, rows=range(blocks), heads=range(head, head + 1))
        del mask
    pattern = builder.finish()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    table = pattern.kv_indices.numel() * 4 / 2**20
    return f"compact={compact}: table {table:.0f} MiB, peak RSS growth {grown:.0f} MiB, {time.perf_counter() - start:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=4096)
    parser.add_argument("--mode", choices=("padded", "compact"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(build(args.heads, args.blocks, args.mode == "compact"), flush=True)
        return
    for mode in ("padded", "compact"):
        command = [sys.executable, __file__, "--heads", str(args.heads), "--blocks", str(args.blocks), "--mode", mode]
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
