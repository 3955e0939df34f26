"""The working-memory unit of the operators' chunked loops.

Operators that would otherwise hold a large float32 temporary (full-resolution score rows,
per-cell scratch, sorted rows) process a few heads, rows or cells at a time so that the
chunk's largest tensor stays within a known share of :data:`CHUNK_ELEMENTS`. Estimators use
the same unit for their chunks of query blocks (or query heads), scored, selected and written
into the pattern one at a time (:mod:`.to_pattern`). Each module imports the constant into its
own namespace, where tests shrink it to force chunking.
"""

from __future__ import annotations

# Float32 elements of one chunked step (256 MiB).
CHUNK_ELEMENTS = 1 << 26
