"""Device helpers used across the package: one definition each."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

__all__ = ["HostCopy", "device_capability", "dot_in_float32", "interpreting", "length_bucket", "synchronized_now"]


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


def dot_in_float32(dtype: torch.dtype) -> bool:
    """Whether Triton kernels take their products in float32 (IEEE) for inputs of ``dtype``:
    float32 inputs always, and bfloat16 under the interpreter, whose bfloat16 ``dot`` is wrong."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


def is_power_of_two(value: int) -> bool:
    """Whether ``value`` is 1, 2, 4, 8, ..."""
    return value >= 1 and value & (value - 1) == 0


def length_bucket(length: int) -> int:
    """``ceil(log2(length))``: the autotuning key that keeps long and short sequences apart."""
    return max(length - 1, 1).bit_length()


def bin_counts(values: torch.Tensor, bins: int) -> torch.Tensor:
    """int64 ``(bins,)``: how often each of ``0 .. bins - 1`` occurs in ``values`` (whose entries
    must lie in that range). ``torch.bincount(values, minlength=bins)`` without its host
    synchronisation on CUDA (it reads the largest value to size its output): an integer
    ``index_add_``, exact and the same in any order."""
    flat = values.reshape(-1).long()
    return torch.zeros(bins, dtype=torch.int64, device=values.device).index_add_(0, flat, torch.ones_like(flat))


@dataclass(frozen=True)
class HostCopy:
    """A device tensor's value on its way to the host without a wait on the device's queue: on
    CUDA a non-blocking copy to pinned memory and an event recorded behind it on the current
    stream; elsewhere the tensor itself. :meth:`get` waits for that event only."""

    value: torch.Tensor | None
    ready: object = None

    @classmethod
    def of(cls, tensor: torch.Tensor) -> HostCopy:
        if not tensor.is_cuda:
            return cls(tensor)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(host, ready)

    def get(self) -> torch.Tensor:
        """The value, on the host once the copy has arrived (on the device off CUDA)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.value
