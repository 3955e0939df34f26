"""benchmarks/vision_fidelity.py on CPU without its 97 MB model: the weight loader on a tiny random DINOv2
saved under the ONNX graph's names, the attention wrapper against the model's own SDPA attention, and the
summary arithmetic."""

from __future__ import annotations

import pytest
import torch
from helpers import load_benchmark

pytest.importorskip("transformers")
from transformers import AttentionInterface, Dinov2Config, Dinov2Model  # noqa: E402

HEADS = 2


@pytest.fixture(scope="module")
def script():
    return load_benchmark("vision_fidelity")


def tiny_model(script, seed=0):
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=40,
        patch_size=14,
        image_size=5 * 14,
        layer_norm_eps=1e-6,
        layerscale_value=0.5,
    )
    backbone = Dinov2Model(config).eval()
    with torch.no_grad():  # random, not the defaults' zeros and ones
        for name, value in backbone.named_parameters():
            if "position" in name or "cls" in name or "lambda" in name or "norm" in name:
                value.copy_(torch.randn_like(value) * 0.5 + (1.0 if "weight" in name or "lambda" in name else 0.0))
    decoder = script.Decoder((24, 8, 6, 4)).eval()
    with torch.no_grad():
        for i in (1, 2, 3):
            bn = getattr(decoder, f"bn{i}")
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return backbone, decoder


def graph_names(script, backbone, decoder) -> dict:
    """The two modules' weights under the ONNX graph's names (what ``onnx_weights`` returns)."""
    weights = {}
    for prefix, module in (("backbone.", backbone), ("decoder.", decoder)):
        for name, value in module.state_dict().items():
            if name.endswith("num_batches_tracked") or name == "embeddings.mask_token":
                continue
            for new, old in script.RENAMED.items():
                name = name.replace(new, old)
            weights[prefix + name] = value.numpy().copy()
    return weights


def test_build_model_reproduces_the_modules_whose_weights_it_reads(script):
    backbone, decoder = tiny_model(script)
    rebuilt, rebuilt_decoder = script.build_model(graph_names(script, backbone, decoder), heads=HEADS)
    pixels = torch.randn(2, 3, 8 * 14, 6 * 14)  # not the 5 x 5 grid of the embeddings: interpolated
    with torch.no_grad():
        expected = script.run_model(backbone, decoder, pixels)
        got = script.run_model(rebuilt, rebuilt_decoder, pixels)
    assert got[0].shape == (2, 48, 24) and got[1].shape == (2, 1, 8 * 14, 6 * 14)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_build_model_names_a_missing_or_misshapen_weight(script):
    weights = graph_names(script, *tiny_model(script))
    del weights["backbone.encoder.layer.1.attention.attention.key.weight"]
    with pytest.raises(ValueError, match=r"backbone\.encoder\.layer\.1\.attention\.attention\.key\.weight"):
        script.build_model(weights, heads=HEADS)
    weights = graph_names(script, *tiny_model(script))
    weights["decoder.bn2.bias"] = weights["decoder.bn2.bias"][:-1]
    with pytest.raises(ValueError, match=r"decoder\.bn2\.bias: shape"):
        script.build_model(weights, heads=HEADS)


def test_the_attention_wrapper_matches_the_models_own_attention(script):
    backbone, decoder = tiny_model(script, seed=1)
    grid = (6, 7)
    pixels = torch.randn(1, 3, grid[0] * 14, grid[1] * 14)
    with torch.no_grad():
        backbone.set_attn_implementation("sdpa")
        features, saliency = script.run_model(backbone, decoder, pixels)
        hook = script.AttentionHook(grid)
        AttentionInterface.register("sparse_attn_vision_test", hook)
        backbone.set_attn_implementation("sparse_attn_vision_test")
        captured = script.run_model(backbone, decoder, pixels)  # dense, capturing q, k, v
        assert len(hook.captured) == 2
        q, k, v = hook.captured[0]
        assert q.shape == (1, HEADS, 1 + 42, 12)
        # The class token's row moved after the grid: its query attends to every key either way.
        runs = {"captured": captured}
        for name, options in (("dense", {}), ("neighborhood", dict(window=(5, 7)))):
            hook.method = (name, options)
            runs[name] = script.run_model(backbone, decoder, pixels)
    for name in ("captured", "dense"):
        torch.testing.assert_close(runs[name][0], features, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(runs[name][1], saliency, rtol=1e-4, atol=1e-5, msg=name)
    # window (5, 7) on a 6 x 7 grid leaves out the keys 5 rows away: the method ran, so the output moved.
    assert 1e-4 < script.rel(runs["neighborhood"][0], features) < 1
    references = script.dense_reference(hook.captured)
    for (q, k, v), (out, lse) in zip(hook.captured, references, strict=True):
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
        torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1))
    densities, errors, recalls, shares = script.layer_metrics(
        hook.captured, references, "neighborhood", dict(window=(5, 7)), grid
    )
    assert len(densities) == len(errors) == len(recalls) == len(shares) == 2
    assert all(share != share for share in shares)  # nan: no pooled or linear blocks
    assert densities == [1.0, 1.0]  # 43 tokens: one block, kept, with the token rule inside it
    assert all(1e-4 < e < 1 for e in errors) and all(0.5 < r < 1 - 1e-5 for r in recalls)
    densities, errors, recalls, _ = script.layer_metrics(
        hook.captured, references, "neighborhood", dict(window=(6, 7)), grid
    )
    assert errors == pytest.approx([0, 0], abs=1e-5) and recalls == pytest.approx([1, 1], abs=1e-5)


def test_top_iou_and_the_settings(script):
    a = torch.arange(100.0)
    assert script.top_iou(a, a) == 1.0
    assert script.top_iou(a, -a) == 0.0
    assert script.top_iou(a, torch.cat([a[:95], -a[95:]])) == pytest.approx(5 / 15)  # 5 of 10 shared
    labels = [label for _, label, _ in script.settings((64, 64))]
    assert labels[0].startswith("exact") and any("GNA" in label for label in labels)
    assert not any("GNA" in label for _, label, _ in script.settings((20, 20)))


def test_finetune_step_trains_the_student_through_the_sparse_attention(script):
    """benchmarks/vision_finetune.py's pieces: a crop's shape and range, and one AdamW step on the
    distillation loss lowers it, with gradients reaching every attention projection through
    ``sa.sparse_attention`` (the student's method) and none reaching the frozen teacher."""
    import copy

    finetune = load_benchmark("vision_finetune")
    teacher, decoder = tiny_model(script, seed=2)
    teacher.set_attn_implementation("sdpa")
    student = copy.deepcopy(teacher)
    grid = (6, 6)
    hook = script.AttentionHook(grid)
    hook.method = ("neighborhood", dict(window=3))
    AttentionInterface.register("sparse_attn_vision_finetune_test", hook)
    student.set_attn_implementation("sparse_attn_vision_finetune_test")
    for parameter in (*teacher.parameters(), *decoder.parameters()):
        parameter.requires_grad_(False)
    image = torch.rand(3, 50, 70)
    crop = finetune.random_crop(image, 6 * 14, torch.Generator().manual_seed(0))
    assert crop.shape == (1, 3, 84, 84) and crop.abs().max() < 3
    pixels = torch.cat([crop, finetune.random_crop(image, 6 * 14, torch.Generator().manual_seed(1))])
    with torch.no_grad():
        target = script.run_model(teacher, decoder, pixels)
    loss = finetune.distillation_loss(script.run_model(student, decoder, pixels), target)
    assert loss > 1e-6  # window 3 of a 6 x 6 grid: not dense
    loss.backward()
    for name, parameter in student.named_parameters():
        if "q_proj" in name or "k_proj" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(parameter.grad is None for parameter in teacher.parameters())
    # A small step against the gradient (first order: the loss falls by about a tenth).
    trained = [parameter for parameter in student.parameters() if parameter.grad is not None]  # not mask_token
    squared = sum(parameter.grad.square().sum() for parameter in trained)
    with torch.no_grad():
        for parameter in trained:
            parameter -= 0.1 * loss / squared * parameter.grad
        after = finetune.distillation_loss(script.run_model(student, decoder, pixels), target)
    assert after < loss
