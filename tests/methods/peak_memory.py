"""Peak resident memory of estimators on CPU, one forked child per case (run as a script by test_streaming.py).

Usage: ``python peak_memory.py SEQ BLOCK BUDGET:METHOD [BUDGET:METHOD ...]``. Prints one JSON
object: per case, the growth of the child's peak resident set during one ``sa.estimate``
call, in bytes, and the pattern's index-table size.

The parent imports everything, builds the inputs and runs each method once on a short
prefix before forking; each child sets the chunk budget (``CHUNK_ELEMENTS`` of every
operator module), runs the short call again and measures ``ru_maxrss`` around one full
call, which after a fork counts from the child's own resident set. Large allocations
are returned to the system when freed (``MALLOC_MMAP_THRESHOLD_``, set by the caller), so
the peak follows the live tensors. One thread, so the fork is safe.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

import sparse_attn as sa

OPTIONS = {
    "xattention": {"stride": 4},
    "block_topk": {"top_k": 8},
    "flexprefill": {"min_budget": 0},
    "proxyattn": {"query_stride": 4},
    "vertical_slash": {"vertical_size": 64, "slash_size": 64},
    "strided_shards": {"local_tokens": 64, "stride": 4},
    "sale": {"threshold": 0.05, "sink_tokens": 16, "local_tokens": 16},
    "anchor": {"theta": 4.0, "step": 4, "init_tokens": 16, "local_tokens": 16},
    "moa": {"alpha": 64.0, "beta": 0.05, "sink_tokens": 16},
}


def structured(heads: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Noise plus a shared direction and a local band (q·k peaks at distance 0): sparse patterns."""
    x = torch.randn(1, heads, seq, 16, generator=generator)
    x[..., 0] += 4.0
    position = torch.arange(seq, dtype=torch.float32)
    for i, period in enumerate((6.0, 17.0, 50.0)):
        x[..., 2 + 2 * i] += 3.0 * torch.cos(2 * torch.pi * position / period)
        x[..., 3 + 2 * i] += 3.0 * torch.sin(2 * torch.pi * position / period)
    return x


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(q, k, method: str, budget: int, block: int) -> dict:
    for name, module in list(sys.modules.items()):
        if name.startswith("sparse_attn.ops") and hasattr(module, "CHUNK_ELEMENTS"):
            module.CHUNK_ELEMENTS = budget
    warm_up(q, k, method, block)
    before = peak_rss_bytes()
    pattern = sa.estimate(q, k, method, block_q=block, block_k=block, **OPTIONS[method])
    return {"peak": peak_rss_bytes() - before, "pattern": pattern.kv_indices.numel() * 4}


def warm_up(q, k, method: str, block: int) -> None:
    """One call on a short prefix: loads code paths, and in a forked child faults in the library
    pages the call executes (a child does not inherit the parent's page tables for them)."""
    prefix = slice(q.shape[2] - 8 * block, None)
    sa.estimate(q[:, :, prefix], k[:, :, prefix], method, block_q=block, block_k=block, **OPTIONS[method])


def main() -> None:
    seq, block = int(sys.argv[1]), int(sys.argv[2])
    cases = [(int(budget), method) for budget, method in (arg.split(":") for arg in sys.argv[3:])]
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    q, k = structured(8, seq, generator), structured(2, seq, generator)
    k[:, :, :8, 0] += 30.0  # attention sinks
    for method in {method for _, method in cases}:
        warm_up(q, k, method, block)
    results = {}
    for budget, method in cases:
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read)
            with os.fdopen(write, "w") as out:
                json.dump(measure(q, k, method, budget, block), out)
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as result:
            results[f"{budget}:{method}"] = json.load(result)
        os.waitpid(child, 0)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
