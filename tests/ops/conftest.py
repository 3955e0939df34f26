import numpy as np
import pytest


@pytest.fixture
def quiet_numpy():
    """A context manager for interpreter runs of the scoring kernel: the interpreter evaluates
    log2(0) for blocks with nothing visible (-inf, as intended), which numpy warns about."""
    return lambda: np.errstate(divide="ignore")
