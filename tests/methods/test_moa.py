"""MoA: per-head windows against streaming's sink+window patterns, calibration (block mass, budget,
local vs diffuse heads), profiles (JSON round trip, patching a tiny model), config errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_qkv
from planted import _rotation

import sparse_attn as sa
from sparse_attn.methods.moa import MoAProfile, block_attention_mass, calibrate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))


def local_and_diffuse_heads(length: int = 2048, dim: int = 64):
    """q, k ``(1, 2, length, dim)``: head 0 attends to a narrow local band, head 1 almost uniformly."""
    generator = torch.Generator().manual_seed(0)
    q = 0.3 * torch.randn(1, 2, length, dim, generator=generator)
    k = 0.3 * torch.randn(1, 2, length, dim, generator=generator)
    band = _rotation(torch.arange(length))[:, :56] * (10 * dim**0.5 / 28) ** 0.5
    q[0, 0, :, :56] += band
    k[0, 0, :, :56] += band
    return q, k


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, block",
    [(2, 4, 2, 100, 100, 16), (1, 6, 3, 40, 130, 16), (1, 12, 4, 77, 77, 32)],
)
def test_each_head_is_streaming_with_its_own_window(batch, q_heads, kv_heads, seq_q, seq_k, block):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, seed=1)
    spans = tuple((float(8 * h), 0.1 * (h % 3)) for h in range(q_heads))
    for causal in (True, False):
        pattern = sa.estimate(q, k, "moa", spans=spans, sink_tokens=20, causal=causal, block_q=block, block_k=block)
        assert pattern.kv_counts.shape == (1, q_heads, -(-seq_q // block))
        for head, (alpha, beta) in enumerate(spans):
            local = math.ceil(min(max(alpha + beta * seq_k, 1.0), seq_k))
            streaming = sa.estimate(
                q, k, "streaming", sink_tokens=20, local_tokens=local, causal=causal, block_q=block, block_k=block
            )
            assert torch.equal(pattern.to_mask()[0, head], streaming.to_mask()[0, 0])


def test_uniform_default_widens_with_the_length():
    short_q, short_k, _ = random_qkv(1, 2, 1, 4096, 4096, 8, seed=0)
    short = sa.estimate(short_q, short_k, "moa")  # span 1024 + 0.25 * 4096 = 2048 tokens = 16 blocks
    assert int(short.kv_counts[0, 0, -1]) == 16 + 1  # the window and the sink block
    assert short.kv_counts.shape[1] == 2


def test_block_attention_mass_matches_dense_softmax():
    q, k, _ = random_qkv(2, 4, 2, 50, 50, 16, seed=3)
    mass = block_attention_mass(q, k, 16)
    logits = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    logits = logits.masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.nn.functional.pad(torch.softmax(logits, -1), (0, 14, 0, 14))
    expected = probs.view(2, 4, 4, 16, 4, 16).sum(dim=(0, 3, 5))
    assert torch.allclose(mass.double(), expected, atol=1e-5)
    assert torch.allclose(mass.sum(-1)[0], torch.tensor([32.0, 32.0, 32.0, 4.0]))


def test_calibration_gives_the_local_head_a_narrow_window_and_meets_the_budget(tmp_path):
    q, k = local_and_diffuse_heads()
    profile = calibrate({3: (q, k)}, density_budget=0.5, block=64)
    (local_alpha, local_beta), (diffuse_alpha, diffuse_beta) = profile.spans(3)
    assert local_alpha + local_beta * 2048 < diffuse_alpha + diffuse_beta * 2048
    assert profile.lengths == (1024, 2048)
    for length in profile.lengths:
        pattern = sa.estimate(q[:, :, :length], k[:, :, :length], "moa", spans=profile.spans(3), block_q=64, block_k=64)
        assert pattern.density() <= 0.5 + 1e-6
    # The saved profile drives the method through profile= and layer=.
    path = tmp_path / "moa.json"
    profile.save(path)
    assert MoAProfile.load(path) == profile
    from_file = sa.estimate(q, k, "moa", profile=str(path), layer=3, block_q=64, block_k=64)
    direct = sa.estimate(q, k, "moa", spans=profile.spans(3), block_q=64, block_k=64)
    assert torch.equal(from_file.to_mask(), direct.to_mask())
    assert sa.metrics.recall(q, k, direct) > 0.8


def test_a_budget_below_the_narrowest_rules_is_an_error():
    q, k = local_and_diffuse_heads(512)
    with pytest.raises(ValueError, match="density_budget"):
        calibrate({0: (q, k)}, density_budget=0.01, block=64)


def test_calibrated_profile_patches_a_tiny_model():
    from tiny_models import PATCH, prompt, tiny_model

    model = tiny_model("llama")
    ids = prompt(256)
    sa.patch(model, method="dense", **PATCH)
    with torch.no_grad(), sa.record(model, capture=True) as rec:
        model(ids)
    captures = {layer: tensors for (layer, _), tensors in rec.tensors.items()}
    profile = calibrate(
        captures, density_budget=0.7, block=16, sink_tokens=16, alphas=(0, 16, 32), betas=(0.0, 0.25, 0.5)
    )
    assert sorted(profile.layers) == [0, 1] and all(len(spans) == 4 for spans in profile.layers.values())
    sa.patch(model, method="dense", layer_methods=profile.layer_methods(), **PATCH)
    with torch.no_grad(), sa.record(model) as rec:
        logits = model(ids).logits
    assert bool(torch.isfinite(logits).all())
    assert {record.method for record in rec.records} == {"moa"}
    sa.unpatch(model)


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(spans=((1.0, 0.1), (2.0,))), TypeError, "spans"),
        (dict(spans="wide"), TypeError, "spans"),
        (dict(spans=((1.0, 0.1),), profile="p.json", layer=0), ValueError, "spans or profile"),
        (dict(layer=2), ValueError, "layer"),
        (dict(profile="p.json"), TypeError, "layer"),
        (dict(sink_tokens=-1), ValueError, "sink_tokens"),
    ],
)
def test_config_errors_name_the_option(options, error, match):
    with pytest.raises(error, match=match):
        sa.get_method("moa").make_config(**options)


def test_head_count_mismatch_and_bad_profile_files_are_errors(tmp_path):
    q, k, _ = random_qkv(1, 4, 2, 32, 32, 8, seed=0)
    with pytest.raises(ValueError, match="4 query heads"):
        sa.estimate(q, k, "moa", spans=((0.0, 0.5),) * 3, block_q=16, block_k=16)
    path = tmp_path / "other.json"
    path.write_text('{"layers": {}}')
    with pytest.raises(ValueError, match="not a MoA profile"):
        sa.estimate(q, k, "moa", profile=str(path), layer=0, block_q=16, block_k=16)
    MoAProfile(layers={1: ((0.0, 0.5),) * 4}).save(path)
    with pytest.raises(ValueError, match="no layer 0"):
        sa.estimate(q, k, "moa", profile=str(path), layer=0, block_q=16, block_k=16)
