"""The operators' dispatch rule: on CUDA, a case the kernel cannot run goes to the reference and says so once."""

from __future__ import annotations

import importlib.util
import warnings
from types import SimpleNamespace

import pytest

from sparse_attn.ops import _dispatch
from sparse_attn.ops.page_select import triton as page_select_kernels

PACKAGE = "sparse_attn.ops.page_select"
# A stand-in for a CUDA tensor: the rule reads only its device before asking the kernel module.
ON_CUDA = SimpleNamespace(device=SimpleNamespace(type="cuda"))


@pytest.fixture(autouse=True)
def fresh_once_set(monkeypatch):
    monkeypatch.setattr(_dispatch, "_WARNED", set())


def _calls(x, **case):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [_dispatch.kernel_for(x, PACKAGE, **case) for _ in range(3)]
    return results, [str(w.message) for w in caught]


def test_an_unsupported_case_on_cuda_warns_once_per_reason_naming_the_operator(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton installed")
    monkeypatch.setattr(page_select_kernels, "unsupported_reason", lambda x, **case: f"takes no head_dim {case['d']}")
    results, messages = _calls(ON_CUDA, d=96)
    assert results == [None, None, None]
    assert messages == ["page_select: its Triton kernel takes no head_dim 96: running the PyTorch reference (slower)"]
    # Another reason is said once too; the first is not repeated.
    assert _calls(ON_CUDA, d=48)[1] == [messages[0].replace("96", "48")]
    assert _calls(ON_CUDA, d=96)[1] == []


def test_a_runnable_case_gets_the_kernel_silently_and_cpu_never_warns(monkeypatch):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton installed")
    monkeypatch.setattr(page_select_kernels, "unsupported_reason", lambda x, **case: None)
    assert _calls(ON_CUDA) == ([page_select_kernels] * 3, [])
    on_cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    assert _calls(on_cpu) == ([None] * 3, [])


def test_missing_triton_on_cuda_is_said_once(monkeypatch):
    monkeypatch.setattr(_dispatch.importlib.util, "find_spec", lambda name: None)
    results, messages = _calls(ON_CUDA)
    assert results == [None] * 3
    assert messages == ["page_select: its Triton kernel needs triton, which is not installed: running the PyTorch "
                        "reference (slower)"]  # fmt: skip
