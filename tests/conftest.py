import os

import pytest
import torch
from helpers import poisoned_allocate

# Without a GPU the Triton kernel runs in Triton's interpreter; the variable must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (pyproject's addopts) each worker takes its share of the cores, so the
# workers' intra-op threads do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# GPU test runs with SPARSE_ATTN_TEST_ONE_CONFIG=1 skip autotuning: every autotuned kernel keeps the
# first of its candidate configurations (the tests check results, not speed; autotuning every
# kernel, pass and length key over up to 16 configurations took minutes per test file on the H200).
if torch.cuda.is_available() and os.environ.get("SPARSE_ATTN_TEST_ONE_CONFIG") == "1":
    import triton

    _autotune = triton.autotune

    def _first_config_only(configs, key, **options):
        return _autotune(configs=list(configs)[:1], key=key, **options)

    triton.autotune = _first_config_only


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_outputs(monkeypatch):
    """Make the Triton and Gluon kernels' outputs NaN-filled before launch, so unwritten elements show."""
    from sparse_attn.backends import launch

    monkeypatch.setattr(launch, "allocate", poisoned_allocate)
