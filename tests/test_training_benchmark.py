"""benchmarks/training.py's backend variants: ``NAME+KEY=VALUE`` specs become kernel_configs overrides."""

from __future__ import annotations

import pytest
from helpers import load_benchmark

from sparse_attn.backends import configs, kernel_configs


@pytest.fixture(scope="module")
def script():
    return load_benchmark("training")


def test_variant_specs_parse_into_kernel_configs(script):
    assert script._variant("flex") == ("flex", {})
    name, overrides = script._variant("auto+kv_streams_per_wave=0+triton_backward_skip_masked=true")
    assert (name, overrides) == ("auto", {"kv_streams_per_wave": 0, "triton_backward_skip_masked": True})
    with kernel_configs(**overrides):
        assert configs.current().kv_streams_per_wave == 0
        assert configs.backward_skips_masked_tiles() is True
    with pytest.raises(TypeError):  # an unknown setting is refused by kernel_configs, not ignored
        with kernel_configs(**script._variant("auto+no_such_setting=1")[1]):
            pass


def test_variant_specs_keep_pass_names_as_strings(script):
    name, overrides = script._variant("auto+gluon_backward=dkdv")
    assert (name, overrides) == ("auto", {"gluon_backward": "dkdv"})
    with kernel_configs(**overrides):
        assert configs.current().gluon_backward == "dkdv"
