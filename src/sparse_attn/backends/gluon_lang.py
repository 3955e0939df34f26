"""The Gluon names the Hopper kernels use (:mod:`.gluon`, :mod:`.gluon_backward`), imported once;
``gluon`` is ``None`` where this Triton has no Gluon (the kernels are then not defined)."""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except ImportError:  # pragma: no cover - triton missing or without Gluon
    gluon = gl = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None

__all__ = ["gl", "gluon", "mbarrier", "tma", "warpgroup_mma", "warpgroup_mma_wait"]
