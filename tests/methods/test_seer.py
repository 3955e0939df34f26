"""SeerAttention (``seer``): the gate's pooling, RoPE handling, logits and pattern; distillation; files; patching; errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark, random_qkv

import sparse_attn as sa
from sparse_attn.geometry import causal_block_mask, diagonal_block_mask
from sparse_attn.methods import seer as seer_method
from sparse_attn.nn.seer import (
    AttnGate,
    SeerGates,
    distill,
    distillation_loss,
    distillation_targets,
    mean_distillation_loss,
    rope_rotate,
    stack_targets,
)
from sparse_attn.ops import to_pattern

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from tiny_models import PATCH, prompt, tiny_model  # noqa: E402

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block): odd lengths, GQA 1-8, 12/4 and 6/3
# heads, batch > 1, Sq < Sk, partial last blocks.
SHAPES = [
    (1, 4, 4, 37, 37, 16, 8),
    (2, 12, 4, 29, 45, 64, 7),
    (2, 8, 1, 33, 33, 32, 5),
    (1, 6, 3, 3, 23, 128, 4),
]


def inverse_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def make_gate(q_heads, kv_heads, dim, block, seed=0, hidden=None):
    torch.manual_seed(seed)
    return AttnGate(
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=dim,
        block_size=block,
        hidden_size=hidden,
        model_inv_freq=inverse_frequencies(dim).float(),
    )


def test_rope_rotate_inverts_and_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = torch.randn(2, 3, 11, 16)
    positions = torch.arange(5, 16)
    inv_freq = inverse_frequencies(16).float()
    rotated = rope_rotate(x, positions, inv_freq)
    angles = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat([angles, angles], -1)
    expected, _ = apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(rotated, expected)
    torch.testing.assert_close(rope_rotate(rotated, positions, inv_freq, inverse=True), x, rtol=1e-5, atol=1e-5)
    partial = rope_rotate(x, positions, inv_freq[:4])  # partial rotary: the last 8 features pass through
    torch.testing.assert_close(partial[..., 8:], x[..., 8:])


@pytest.mark.parametrize("shape", SHAPES)
def test_pooling_matches_its_definition(shape):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block = shape
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=1)
    gate = make_gate(q_heads, kv_heads, dim, block)
    inputs = gate.pool(q, k)
    q_pre = rope_rotate(q, torch.arange(seq_q) + seq_k - seq_q, gate.model_inv_freq, inverse=True)
    k_pre = rope_rotate(k, torch.arange(seq_k), gate.model_inv_freq, inverse=True)
    for i in range(inputs.q.shape[2]):
        rows = q_pre[:, :, i * block : (i + 1) * block]
        torch.testing.assert_close(inputs.q[:, :, i], rows.mean(2))
        assert int(inputs.q_positions[i]) == seq_k - seq_q + i * block
    for j in range(inputs.k.shape[2]):
        keys = k_pre[:, :, j * block : (j + 1) * block]
        expected = torch.cat([keys.amax(2), keys.amin(2), keys.mean(2)], dim=-1)
        torch.testing.assert_close(inputs.k[:, :, j], expected)
        assert int(inputs.k_positions[j]) == j * block


@pytest.mark.parametrize("kind, layer", [("llama", 1), ("qwen3", 0), ("gemma3", 1)])
def test_pooling_undoes_the_models_rope(kind, layer):
    """The captured post-RoPE q/k of a real (tiny) model, un-rotated, are its pre-RoPE q/k (after q/k norms)."""
    model = tiny_model(kind)
    gates = SeerGates.for_model(model, block_size=1)
    if kind == "gemma3":  # the global layer: its own RoPE base, not the sliding layers'
        assert gates[layer].rope_theta == model.config.rope_parameters["full_attention"]["rope_theta"]
    attention = model.model.layers[layer].self_attn
    dim = gates[layer].head_dim
    pre_rope = {}

    def keep(name):
        def hook(module, inputs, output):
            # (B, S, H * D) projections or (B, H, S, D) / (B, S, H, D) norm outputs, as (B, H, S, D).
            output = output.view(1, 40, -1, dim) if output.dim() == 3 else output
            pre_rope[name] = output if output.shape[2] == 40 else output.transpose(1, 2)

        return hook

    for name in ("q", "k"):
        module = getattr(attention, f"{name}_norm", None) or getattr(attention, f"{name}_proj")
        module.register_forward_hook(keep(name))
    inputs, _ = distillation_targets(model, prompt(40), gates, backend="reference")[layer]
    torch.testing.assert_close(inputs.q, pre_rope["q"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inputs.k[..., 2 * dim :], pre_rope["k"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_scores_and_pattern(shape):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block = shape
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=2)
    gate = make_gate(q_heads, kv_heads, dim, block, hidden=24)
    logits = gate(q, k)
    n_q, n_kv = -(-seq_q // block), -(-seq_k // block)
    assert logits.shape == (batch, q_heads, n_q, n_kv) and logits.dtype == torch.float32
    valid = causal_block_mask(seq_q, seq_k, block, block)
    assert torch.equal(torch.isfinite(logits), valid.expand_as(logits))
    torch.testing.assert_close(logits.softmax(-1).sum(-1), torch.ones(batch, q_heads, n_q))

    dense = sa.estimate(q, k, "seer", gates=gate, threshold=0.0, last_blocks_dense=0)
    assert (dense.block_q, dense.block_k) == (block, block) and dense.kv_counts.shape == (batch, q_heads, n_q)
    assert torch.equal(dense.kv_counts, valid.sum(-1).int().expand_as(dense.kv_counts))
    densities = [
        sa.estimate(q, k, "seer", gates=gate, threshold=t, last_blocks_dense=0).density()
        for t in (0.0, 0.05, 0.2, 0.999)
    ]
    assert densities == sorted(densities, reverse=True)
    only_diagonal = sa.estimate(q, k, "seer", gates=gate, threshold=0.999, last_blocks_dense=0)
    diagonal = diagonal_block_mask(seq_q, seq_k, block, block)
    assert torch.equal(only_diagonal.kv_counts, diagonal.sum(-1).int().expand_as(only_diagonal.kv_counts))

    top = sa.estimate(q, k, "seer", gates=gate, top_k=2, last_blocks_dense=0)
    top.ensure_valid(causal=True)
    scores = logits.softmax(-1)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(n_q):
                lists = set(top.kv_indices[b, h, i, : top.kv_counts[b, h, i]].tolist())
                best = set(scores[b, h, i].topk(min(2, int(valid[i].sum()))).indices.tolist())
                own = set(torch.nonzero(diagonal[i]).flatten().tolist())
                assert lists == best | own


def test_threshold_rule_is_the_gate_softmax():
    q, k, _ = random_qkv(2, 6, 3, 50, 50, 16, seed=4)
    gate = make_gate(6, 3, 16, 5)
    scores = gate(q, k).softmax(-1)
    pattern = sa.estimate(q, k, "seer", gates=gate, threshold=0.08, last_blocks_dense=0)
    expected = (scores > 0.08) | diagonal_block_mask(50, 50, 5, 5)
    for b in range(2):
        for h in range(6):
            for i in range(10):
                kept = pattern.kv_indices[b, h, i, : pattern.kv_counts[b, h, i]].tolist()
                assert kept == torch.nonzero(expected[b, h, i]).flatten().tolist()


@pytest.mark.parametrize("shape", [(2, 6, 3, 50, 50, 5), (1, 4, 2, 23, 41, 4), (1, 4, 4, 9, 9, 8)])
@pytest.mark.parametrize("last", [1, 2, 3])
@pytest.mark.parametrize("rule", [{"threshold": 0.08}, {"top_k": 1}])
def test_last_blocks_dense(shape, last, rule):
    """The last ``last_blocks_dense`` query blocks keep every causally valid block; the rest is the gate's."""
    batch, q_heads, kv_heads, seq_q, seq_k, block = shape
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 16, seed=5)
    gate = make_gate(q_heads, kv_heads, 16, block)
    gated = sa.estimate(q, k, "seer", gates=gate, last_blocks_dense=0, **rule)
    pattern = sa.estimate(q, k, "seer", gates=gate, last_blocks_dense=last, **rule)
    pattern.ensure_valid(causal=True)
    if last == 2:  # the default (the released code's)
        default = sa.estimate(q, k, "seer", gates=gate, **rule)
        assert torch.equal(default.kv_counts, pattern.kv_counts)
    n_q = -(-seq_q // block)
    valid = causal_block_mask(seq_q, seq_k, block, block)
    for i in range(n_q):
        for b in range(batch):
            for h in range(q_heads):
                kept = pattern.kv_indices[b, h, i, : pattern.kv_counts[b, h, i]].tolist()
                if i >= n_q - last:
                    assert kept == torch.nonzero(valid[i]).flatten().tolist()
                else:
                    assert kept == gated.kv_indices[b, h, i, : gated.kv_counts[b, h, i]].tolist()


def test_streamed_pattern_equals_one_chunk(monkeypatch):
    q, k, _ = random_qkv(1, 4, 2, 61, 75, 16, seed=6)
    gate = make_gate(4, 2, 16, 4)
    whole = sa.estimate(q, k, "seer", gates=gate, threshold=0.02)
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)
    streamed = sa.estimate(q, k, "seer", gates=gate, threshold=0.02)
    assert torch.equal(whole.kv_counts, streamed.kv_counts)
    width = int(whole.kv_counts.max())
    assert torch.equal(whole.kv_indices[..., :width], streamed.kv_indices[..., :width])


def test_transposed_bfloat16_inputs_as_transformers_passes_them():
    q, k, _ = random_qkv(2, 6, 3, 45, 61, 16, dtype=torch.bfloat16, seed=1, transposed=True)
    gate = make_gate(6, 3, 16, 8)
    pattern = sa.estimate(q, k, "seer", gates=gate, threshold=0.05)
    contiguous = sa.estimate(q.contiguous(), k.contiguous(), "seer", gates=gate, threshold=0.05)
    assert torch.equal(pattern.kv_counts, contiguous.kv_counts)
    torch.testing.assert_close(gate(q, k), gate(q.float(), k.float()))


def test_distillation_loss_is_the_row_kl():
    logits = torch.randn(2, 3, 8, 8).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    target = torch.rand(2, 3, 8, 8) * torch.ones(8, 8).tril()
    target = target / target.sum(-1, keepdim=True)
    log_p = logits.log_softmax(-1)
    terms = torch.where(target > 0, target * (target.log() - log_p), torch.zeros(()))
    torch.testing.assert_close(distillation_loss(logits, target, skip_fraction=0.0), terms.sum(-1).mean())
    torch.testing.assert_close(distillation_loss(logits, target), terms[:, :, 2:].sum(-1).mean())
    assert float(distillation_loss(target.log(), target, skip_fraction=0.0)) == pytest.approx(0.0, abs=1e-6)


def test_training_reduces_the_kl_on_a_tiny_model(tmp_path):
    model = tiny_model("qwen3")
    gates = SeerGates.for_model(model, block_size=16, name="tiny-qwen3")
    data = stack_targets(
        [distillation_targets(model, prompt(96, seed=s), gates, backend="reference") for s in range(6)]
    )
    heldout = distillation_targets(model, prompt(96, batch=2, seed=99), gates, backend="reference")
    before = mean_distillation_loss(gates, heldout)
    losses = distill(gates, data, steps=25, lr=3e-3, warmup=2, batch_size=4)
    after = mean_distillation_loss(gates, heldout)
    # Random weights and tokens leave little to generalise; the held-out KL still falls.
    assert losses[-1] < 0.8 * losses[0] and after < 0.95 * before
    assert all(not p.requires_grad for p in gates.parameters())

    # Save / load round trip: float32 exactly, the default bfloat16 file within its precision.
    q, k, _ = random_qkv(1, 4, 2, 64, 64, 16, seed=8)
    size = gates.save(tmp_path / "exact.pt", dtype=torch.float32)
    loaded = SeerGates.load(tmp_path / "exact.pt")
    assert loaded.layers == gates.layers == [0, 1] and loaded.model == "tiny-qwen3"
    assert size == (tmp_path / "exact.pt").stat().st_size
    for layer in gates.layers:
        torch.testing.assert_close(loaded[layer](q, k), gates[layer](q, k), rtol=0, atol=0)
    assert gates.save(tmp_path / "small.pt") < size
    small = SeerGates.load(tmp_path / "small.pt")
    torch.testing.assert_close(small[1](q, k).softmax(-1), gates[1](q, k).softmax(-1), rtol=0, atol=2e-2)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_patch_with_layer_methods(tmp_path, kind):
    """Through sa.patch: every gated layer runs seer; threshold 0 keeps every block, so logits equal dense."""
    model = tiny_model(kind)
    gates = SeerGates.for_model(model, block_size=16)
    if kind == "gemma3":
        assert gates.layers == [1]  # the global layer only
    gates.save(tmp_path / "gates.pt")
    ids = prompt(96, batch=2)
    expected = model(ids).logits
    for source in (gates, tmp_path / "gates.pt"):
        sa.patch(model, layer_methods=seer_method.seer_layer_methods(source, threshold=0.0), **PATCH)
        with sa.record(model) as recorder:
            logits = model(ids).logits
        sa.unpatch(model)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert {r.method for r in recorder.records if r.kind == "sparse"} == {"seer"}
    sa.patch(model, layer_methods=seer_method.seer_layer_methods(gates, top_k=1), **PATCH)
    with sa.record(model) as recorder:
        assert torch.isfinite(model(ids).logits).all()
    sa.unpatch(model)
    assert max(r.density for r in recorder.records if r.kind == "sparse") < 1.0


def test_errors(tmp_path):
    q, k, _ = random_qkv(1, 4, 2, 32, 32, 16, seed=0)
    gate = make_gate(4, 2, 16, 8)
    gates = SeerGates({0: gate, 3: make_gate(4, 2, 16, 8)})
    with pytest.raises(ValueError, match="threshold or top_k"):
        sa.estimate(q, k, "seer", gates=gate, threshold=0.1, top_k=2)
    with pytest.raises(ValueError, match="threshold must be in"):
        sa.estimate(q, k, "seer", gates=gate, threshold=1.5)
    with pytest.raises(TypeError, match="threshold must be a float"):
        sa.estimate(q, k, "seer", gates=gate, threshold="high")
    with pytest.raises(TypeError, match="top_k must be an int"):
        sa.estimate(q, k, "seer", gates=gate, top_k=2.5)
    with pytest.raises(ValueError, match="last_blocks_dense"):
        sa.estimate(q, k, "seer", gates=gate, last_blocks_dense=-1)
    with pytest.raises(TypeError, match="last_blocks_dense"):
        sa.estimate(q, k, "seer", gates=gate, last_blocks_dense=True)
    with pytest.raises(TypeError, match="gates must be"):
        sa.estimate(q, k, "seer", gates=3)
    with pytest.raises(ValueError, match="choose one with layer="):
        sa.estimate(q, k, "seer", gates=gates)
    with pytest.raises(ValueError, match="no layer 1"):
        sa.estimate(q, k, "seer", gates=gates, layer=1)
    with pytest.raises(ValueError, match="layer selects a layer"):
        sa.estimate(q, k, "seer", gates=gate, layer=0)
    with pytest.raises(ValueError, match="train_seer.py"):
        sa.estimate(q, k, "seer")  # no gates: say how to get them
    with pytest.raises(ValueError, match="gates: this gate was trained for 4 query heads"):
        sa.estimate(q[:, :2], k, "seer", gates=gate)
    with pytest.raises(ValueError, match="gates file not found"):
        sa.estimate(q, k, "seer", gates=tmp_path / "missing.pt", layer=0)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a SeerAttention gates file"):
        SeerGates.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no trained SeerAttention gates are shipped for 'no-such-model'.*train_seer"):
        seer_method.seer_layer_methods("no-such-model")
    with pytest.raises(ValueError, match="no shipped SeerAttention gates.*train_seer"):
        seer_method.seer_layer_methods(tiny_model("llama"))
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttnGate(q_heads=6, kv_heads=4, head_dim=16)
    with pytest.raises(TypeError, match="gates\\[2\\] must be an AttnGate"):
        SeerGates({2: "gate"})
    model = tiny_model("llama")
    sa.patch(model, method="seer", **PATCH)  # options are valid; the missing gates show at the first prefill
    with pytest.raises(ValueError, match="seer_layer_methods"):
        model(prompt(64))
    sa.unpatch(model)
    assert sa.get_method("seer").defaults() == {
        "gates": None,
        "layer": None,
        "threshold": None,
        "top_k": None,
        "last_blocks_dense": 2,
    }


SHIPPED = seer_method.shipped_gates_path("smollm2-135m")


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no gates shipped for smollm2-135m yet")
def test_shipped_smollm2_gates():
    assert SHIPPED.stat().st_size < 8 * 2**20  # a few MB at most
    methods = seer_method.seer_layer_methods("smollm2-135m")
    assert sorted(methods) == list(range(30))
    gate = methods[0][1]["gates"]
    assert (gate.q_heads, gate.kv_heads, gate.head_dim, gate.block_size) == (9, 3, 64, 64)


GEMMA = seer_method.shipped_gates_path("gemma3-270m")


@pytest.mark.skipif(not GEMMA.is_file(), reason="no gates shipped for gemma3-270m yet")
def test_shipped_gemma_gates_cover_its_global_layers_only():
    assert GEMMA.stat().st_size < 8 * 2**20  # a few MB at most
    methods = seer_method.seer_layer_methods("gemma3-270m")
    assert sorted(methods) == [5, 11, 17]  # the sliding-window layers keep their own attention
    gate = methods[5][1]["gates"]
    assert (gate.q_heads, gate.kv_heads, gate.head_dim, gate.block_size) == (4, 1, 256, 64)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_train_script_quick_runs_end_to_end(tmp_path):
    module = load_benchmark("train_seer")
    result = module.main(
        ["--quick", "--steps", "4", "--max-sequences", "2", "--gates-out", str(tmp_path / "g.pt")]
        + ["--output", str(tmp_path / "r.json")]
    )
    assert (tmp_path / "g.pt").is_file() and (tmp_path / "r.json").is_file()
    assert len(result["meta"]["train_loss"]) == 4 and result["meta"]["gate_file_bytes"] > 0
    settings = {row["setting"] for row in result["rows"]}
    assert "seer threshold=0.002" in settings and "xattention" in settings
    assert all(0 < row["density"] <= 1 and 0 < row["recall"] <= 1 + 1e-6 for row in result["rows"])


@pytest.mark.gpu
def test_long_sequence_estimate_on_gpu_stays_small():
    """64K tokens, 32/8 heads, D128 bf16: the estimate is valid and its extra memory far below S^2.
    Estimate: seconds (the 64K inputs are drawn on the CPU; the estimate and the kernel / reference
    comparison on a 4K x 8K slice, 1G float32 logits, run on the GPU)."""
    device = torch.device("cuda")
    seq = 65536
    q, k, _ = random_qkv(1, 32, 8, seq, seq, 128, dtype=torch.bfloat16, device=device, seed=0)
    gate = make_gate(32, 8, 128, 64).to(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pattern = sa.estimate(q, k, "seer", gates=gate, top_k=64)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    pattern.ensure_valid(causal=True)
    # top-64 plus the diagonal, except the last two query blocks (last_blocks_dense=2): every causal block.
    assert int(pattern.kv_counts[..., :-2].max()) <= 64 + 1
    assert pattern.kv_counts[..., -2:].tolist() == [[[seq // 64 - 1, seq // 64]] * 32]
    assert extra < 4 * 2**30, f"peak extra memory {extra / 2**30:.2f} GiB"
    from sparse_attn.ops.pooled_attention_map import pooled_attention_map, pooled_attention_map_reference

    # The kernel against the PyTorch reference run on the GPU too (float32 products as on the CPU,
    # where this 4K x 8K slice of 32 heads took 44 s on 2 cores).
    small_q, small_k = q[:, :, -4096:], k[:, :, -8192:]
    options = dict(block_q=64, block_k=64, scale=128**-0.5)
    kernel = pooled_attention_map(small_q, small_k, **options)
    torch.testing.assert_close(
        kernel, pooled_attention_map_reference(small_q, small_k, **options), rtol=1e-3, atol=1e-5
    )
