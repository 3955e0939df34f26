"""Device helpers used across the package: one definition each."""

from __future__ import annotations

import os
import time

import torch

__all__ = ["device_capability", "interpreting", "synchronized_now"]


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device``, or ``None`` off CUDA."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def synchronized_now(device: torch.device) -> float:
    """Wall-clock seconds after the device's queued work has finished (CUDA synchronizes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
