"""The one rule by which every operator chooses between its fused Triton kernel and its PyTorch reference.

An operator with a kernel keeps it in ``<op>/triton.py`` beside the reference in ``<op>/naive.py``;
the kernel module exposes ``unsupported_reason(x, **case) -> str | None``, its can-run check. The
operator's entry point in ``<op>/__init__.py`` asks :func:`kernel_for` and runs the kernel module
it gets back, or the reference when it gets ``None``. The kernel runs when the input is on CUDA,
triton is installed and the can-run check passes; everywhere else, the CPU included, the
reference runs, so a pattern estimated on CPU never depends on a kernel. On CUDA the reference
is the slower path: :func:`kernel_for` then says so once per (operator, reason) with a
``UserWarning`` naming the operator and the reason (:func:`reference_fallback` for a rule an
entry point adds of its own).

The kernel module is imported on first use: importing triton is a large share of
``import sparse_attn`` and is never needed on CPU. Under ``TRITON_INTERPRET=1`` the kernels
also run on CPU tensors when called directly (that is how the tests compare them with the
references); the dispatch rule does not pick them there.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from types import ModuleType

import torch

from ..utils import interpreting

__all__ = [
    "device_unsupported_reason",
    "head_dim_reason",
    "head_tile_unsupported_reason",
    "kernel_for",
    "power_of_two_reason",
    "qk_unsupported_reason",
    "reference_fallback",
]

_WARNED: set[tuple[str, str]] = set()


def reference_fallback(package: str, reason: str) -> None:
    """Say once per (operator, reason) that operator ``package`` runs its PyTorch reference on CUDA, and why."""
    if (package, reason) in _WARNED:
        return
    _WARNED.add((package, reason))
    name = package.rsplit(".", 1)[-1]
    warnings.warn(f"{name}: its Triton kernel {reason}: running the PyTorch reference (slower)", stacklevel=3)


def kernel_for(x: torch.Tensor, package: str, **case) -> ModuleType | None:
    """The kernel module ``<package>.triton`` when it should run on ``x`` and ``case``, else ``None``.

    ``case`` is passed to the kernel module's ``unsupported_reason(x, **case)``. On CUDA a
    ``None`` comes with a once-per-reason warning (:func:`reference_fallback`).
    """
    if x.device.type != "cuda":
        return None
    if importlib.util.find_spec("triton") is None:
        reference_fallback(package, "needs triton, which is not installed")
        return None
    kernel = importlib.import_module(".triton", package)
    reason = kernel.unsupported_reason(x, **case)
    if reason is not None:
        reference_fallback(package, reason)
        return None
    return kernel


def device_unsupported_reason(x: torch.Tensor) -> str | None:
    """The device part of every kernel's can-run check: a CUDA tensor, or Triton's CPU interpreter."""
    if x.device.type != "cuda" and not interpreting():
        return "needs a CUDA device (or TRITON_INTERPRET=1)"
    return None


def power_of_two_reason(name: str, value: int, low: int, high: int, why: str = "") -> str | None:
    """A can-run check's line when ``value`` is not a power of two in ``[low, high]``, else ``None``."""
    if value & (value - 1) == 0 and low <= value <= high:
        return None
    return f"takes {name} a power of two in [{low}, {high}]{why}, got {value}"


def qk_unsupported_reason(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """The shared part of the can-run checks of kernels that read ``q (B, Hq, Sq, D)`` and
    ``k (B, Hkv, Sk, D)``: the device, one float16/bfloat16/float32 dtype on one device, and a
    head_dim that is a power of two from 16 to 256."""
    reason = device_unsupported_reason(q)
    if reason is not None:
        return reason
    if q.dim() != 4 or k.dim() != 4:
        return "takes q (B, Hq, Sq, D) and k (B, Hkv, Sk, D)"
    reason = _dtype_reason(q.dtype)
    if reason is not None:
        return reason
    if k.dtype != q.dtype:
        return f"needs q and k of one dtype, got {q.dtype} and {k.dtype}"
    if k.device != q.device:
        return "takes q and k on one device"
    return head_dim_reason(q.shape[-1])


def head_tile_unsupported_reason(x: torch.Tensor, head_dim: int, triton_module) -> str | None:
    """The common can-run check of kernels that hold whole ``head_dim`` rows in a tile: triton
    installed (``triton_module`` is the kernel module's ``triton``, ``None`` when it failed to
    import), the device, a float16 / bfloat16 / float32 ``x`` and a power-of-two ``head_dim`` from
    16 to 256 (the dtype and head_dim rules of :func:`qk_unsupported_reason`)."""
    if triton_module is None:
        return "triton is not installed"
    reason = device_unsupported_reason(x)
    if reason is not None:
        return reason
    return _dtype_reason(x.dtype) or head_dim_reason(head_dim)


def _dtype_reason(dtype: torch.dtype) -> str | None:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32, not {dtype}"
    return None


def head_dim_reason(dim: int) -> str | None:
    """A can-run check's line when ``dim`` is not a power of two from 16 to 256, else ``None``."""
    if dim < 16 or dim > 256 or dim & (dim - 1):
        return f"takes a head_dim that is a power of two from 16 to 256, not {dim}"
    return None
