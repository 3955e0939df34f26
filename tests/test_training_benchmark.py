"""Backend variants of the benchmarks: ``NAME+KEY=VALUE`` specs become kernel_configs overrides
(``sparse_attn.bench.backend_variant``, used by benchmarks/training.py and benchmarks/kernel_grid.py)."""

from __future__ import annotations

import pytest
from helpers import load_benchmark

from sparse_attn.backends import configs, kernel_configs
from sparse_attn.bench import backend_variant


def test_variant_specs_parse_into_kernel_configs():
    assert backend_variant("flex") == ("flex", {})
    name, overrides = backend_variant("auto+kv_streams_per_wave=0+triton_backward_skip_masked=true")
    assert (name, overrides) == ("auto", {"kv_streams_per_wave": 0, "triton_backward_skip_masked": True})
    with kernel_configs(**overrides):
        assert configs.current().kv_streams_per_wave == 0
        assert configs.backward_skips_masked_tiles() is True
    with pytest.raises(TypeError):  # an unknown setting is refused by kernel_configs, not ignored
        with kernel_configs(**backend_variant("auto+no_such_setting=1")[1]):
            pass


def test_variant_specs_keep_pass_names_as_strings():
    name, overrides = backend_variant("auto+gluon_backward=dkdv+gluon_persistent=false")
    assert (name, overrides) == ("auto", {"gluon_backward": "dkdv", "gluon_persistent": False})
    with kernel_configs(**overrides):
        assert configs.current().gluon_backward == "dkdv"
        assert configs.current().gluon_persistent is False


def test_training_benchmark_reads_variants_with_the_shared_parser():
    assert load_benchmark("training").backend_variant is backend_variant
