"""The kernel benchmark's arithmetic and the ``sparse-attn bench`` / ``methods`` commands (CPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import token_mask

import sparse_attn as sa
from sparse_attn.bench import visible_pairs
from sparse_attn.cli import main


@pytest.mark.parametrize("seq_q, seq_k, block_q, block_k", [(64, 64, 16, 16), (50, 90, 16, 32), (77, 77, 32, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_counts_the_computed_query_key_pairs(seq_q, seq_k, block_q, block_k, causal):
    pattern = sa.random_pattern(
        batch=2, heads=3, seq_q=seq_q, seq_k=seq_k, density=0.5, block_q=block_q, block_k=block_k, causal=causal, seed=1
    )
    expected = int(token_mask(pattern, batch=2, q_heads=3, causal=causal).sum())
    assert visible_pairs(pattern, causal=causal) == expected


def test_bench_command_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert main(["bench", "--device", "cpu", "--lengths", "256", "--densities", "0.5", "1.0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "flex ms" in printed and "reference ms" in printed and "sdpa ms" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [row["seq"] for row in rows] == [256, 256]
    assert rows[1]["density"] == 1.0 and rows[1]["pair_fraction"] == 1.0
    for row in rows:
        assert not row["errors"]
        assert row["flex_ms"] > 0 and row["reference_ms"] > 0 and row["sdpa_ms"] > 0


def test_kernel_case_without_causal_mask():
    """causal=False: non-causal patterns and SDPA, densities over every block, pairs over every key."""
    from sparse_attn.bench import KernelCase, run_kernel_case

    case = KernelCase(seq=200, q_heads=4, kv_heads=4, head_dim=16, dtype="float32", block=32, densities=(0.25, 1.0))
    rows = run_kernel_case(dataclasses.replace(case, causal=False), ("reference",), torch.device("cpu"))
    causal_rows = run_kernel_case(case, ("reference",), torch.device("cpu"))
    n_blocks = -(-200 // 32)
    assert [row["causal"] for row in rows] == [False, False] and causal_rows[0]["causal"]
    assert rows[0]["density"] == pytest.approx(round(0.25 * n_blocks) / n_blocks, abs=1e-4)
    assert rows[1]["density"] == 1.0 and rows[1]["pair_fraction"] == 1.0
    # A random non-causal pattern keeps blocks after the diagonal; the causal one cannot.
    assert rows[0]["pair_fraction"] != causal_rows[0]["pair_fraction"]
    for row in rows:
        assert not row["errors"] and row["reference_ms"] > 0 and row["sdpa_ms"] > 0


def test_kernel_case_times_backend_variants_under_their_overrides(monkeypatch):
    """A column ``reference+kv_streams_per_wave=0`` runs the reference backend with that override in
    force, beside the plain column, on the same pattern."""
    import sparse_attn.bench as bench
    from sparse_attn.backends import configs

    seen = set()
    real = bench.block_sparse_attention

    def spy(*args, **keywords):
        seen.add((keywords["backend"], configs.current().kv_streams_per_wave))
        return real(*args, **keywords)

    monkeypatch.setattr(bench, "block_sparse_attention", spy)
    case = bench.KernelCase(seq=96, q_heads=2, kv_heads=2, head_dim=16, dtype="float32", block=32, densities=(0.5,))
    columns = ("reference", "reference+kv_streams_per_wave=0")
    (row,) = bench.run_kernel_case(case, columns, torch.device("cpu"))
    assert not row["errors"]
    assert row["reference_ms"] > 0 and row["reference+kv_streams_per_wave=0_ms"] > 0
    assert seen == {("reference", None), ("reference", 0)}


def test_methods_command_lists_every_method_with_paper_and_defaults(capsys):
    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    for method in sa.list_methods():
        assert method.name in printed and method.paper in printed
    assert "threshold=0.9" in printed  # xattention's default


def test_bench_rejects_unknown_commands(capsys):
    with pytest.raises(SystemExit):
        main(["benchmark"])
    assert "invalid choice" in capsys.readouterr().err


def test_dense_baselines_time_sdpa_on_cpu():
    from sparse_attn.bench import dense_baselines

    q = torch.randn(1, 4, 32, 16)
    k = torch.randn(1, 2, 32, 16)
    runners = dense_baselines(q, k, k, torch.device("cpu"))
    assert list(runners) == ["sdpa"]
    out = runners["sdpa"]()
    assert out.shape == q.shape


def test_waves_argument_parses_and_labels():
    import argparse

    from sparse_attn.bench import add_waves_argument, waves_label

    parser = argparse.ArgumentParser()
    add_waves_argument(parser)
    assert parser.parse_args([]).kv_streams_per_wave is None
    assert parser.parse_args(["--kv-streams-per-wave", "0"]).kv_streams_per_wave == 0
    assert waves_label(None) == "auto" and waves_label(2) == 2


def test_smooth_sequence_is_the_ar1_recurrence_with_unit_variance():
    from sparse_attn.bench import smooth_sequence

    shape, rho = (2, 3, 300, 5), 0.9
    y = smooth_sequence(shape, rho, generator=torch.Generator().manual_seed(1), chunk=16)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = torch.empty_like(x)
    expected[..., 0, :] = x[..., 0, :]
    for t in range(1, shape[-2]):
        expected[..., t, :] = rho * expected[..., t - 1, :] + (1 - rho * rho) ** 0.5 * x[..., t, :]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    long = smooth_sequence((64, 4096, 8), rho, generator=torch.Generator().manual_seed(2))
    assert abs(long.var().item() - 1) < 0.05
    lag1 = (long[:, 1:] * long[:, :-1]).mean().item()
    assert abs(lag1 - rho) < 0.03
    white = smooth_sequence((4, 7, 3), 0.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(white, torch.randn((4, 7, 3), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.5"])
def test_smooth_sequence_rejects_bad_correlation(bad):
    from sparse_attn.bench import smooth_sequence

    with pytest.raises(ValueError, match="correlation"):
        smooth_sequence((4, 3), bad)


def test_smooth_grid_correlates_every_grid_dimension():
    from sparse_attn.bench import smooth_grid

    grid, rho = (6, 10, 12), 0.8
    x = smooth_grid((512,), grid, 4, rho, generator=torch.Generator().manual_seed(5), chunk=8)
    assert x.shape == (512, 720, 4)
    cube = x.view(512, *grid, 4)
    assert abs(cube.var().item() - 1) < 0.05
    for axis in (1, 2, 3):
        lag1 = (cube.narrow(axis, 1, grid[axis - 1] - 1) * cube.narrow(axis, 0, grid[axis - 1] - 1)).mean().item()
        assert abs(lag1 - rho) < 0.03, axis
    diagonal = (cube[:, 1:, 1:, 1:] * cube[:, :-1, :-1, :-1]).mean().item()
    assert abs(diagonal - rho**3) < 0.03
    with pytest.raises(ValueError, match="grid"):
        smooth_grid((1,), (4, 0), 4, 0.5)
