"""sparse_attn.patch_diffusers on tiny randomly initialised diffusers transformers (CPU, float32).

Flux (2D image, text *before* the image in joint attention, single-stream blocks that concatenate
the text themselves), Wan 2.1 (3D video, self-attention plus dense cross-attention) and
HunyuanVideo (text *after* the video, a key-padding mask over the text). The manual reference is
each unpatched model with ``torch.nn.functional.scaled_dot_product_attention`` replaced by SDPA
under a brute-force NATTEN mask written here.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.integrations.diffusers import SparseAttnProcessor, attention_layers, unpatch_diffusers

SDPA = F.scaled_dot_product_attention
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def natten_mask(grid, window, text: int, position: str) -> torch.Tensor:
    """Bool ``(S, S)`` in raster order: NATTEN windows (shifted inward at borders, dilation 1)
    between grid tokens; text rows and columns all True."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(size) for size in grid], indexing="ij")).reshape(len(grid), -1)
    grid_tokens = coords.shape[1]
    mask = torch.ones(grid_tokens, grid_tokens, dtype=torch.bool)
    for dim, (size, w) in enumerate(zip(grid, window, strict=True)):
        start = (torch.arange(size) - w // 2).clamp(0, size - w)
        keys = torch.arange(size)
        allowed = (keys[None] >= start[:, None]) & (keys[None] < start[:, None] + w)
        mask &= allowed[coords[dim][:, None], coords[dim][None, :]]
    full = torch.ones(grid_tokens + text, grid_tokens + text, dtype=torch.bool)
    first = text if position == "before" else 0
    full[first : first + grid_tokens, first : first + grid_tokens] = mask
    return full


def masked_sdpa(mask: torch.Tensor):
    """SDPA that applies ``mask`` to calls of its length (self/joint attention), AND-ed with their own mask."""

    def sdpa(query, key, value, attn_mask=None, **kwargs):
        if query.shape[-2] == key.shape[-2] == mask.shape[0]:
            attn_mask = mask if attn_mask is None else attn_mask.bool() & mask
        return SDPA(query, key, value, attn_mask=attn_mask, **kwargs)

    return sdpa


def manual(monkeypatch, run, mask: torch.Tensor, **inputs) -> torch.Tensor:
    with monkeypatch.context() as patched:
        patched.setattr(F, "scaled_dot_product_attention", masked_sdpa(mask))
        return run(**inputs)


# Tiny models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    height, width, text = 5, 7, 3
    img_ids = torch.zeros(height * width, 3)
    img_ids[:, 1] = torch.arange(height).repeat_interleave(width)
    img_ids[:, 2] = torch.arange(width).repeat(height)
    inputs = dict(
        hidden_states=torch.randn(1, height * width, 4),
        encoder_hidden_states=torch.randn(1, text, 8),
        pooled_projections=torch.randn(1, 8),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
    )

    def run(timestep: float = 0.5) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, timestep=torch.tensor([timestep]), return_dict=False)[0]

    yield model, run, (height, width), text
    if hasattr(model, "_sparse_attn_diffusers"):
        unpatch_diffusers(model)


@pytest.fixture(scope="module")
def wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64,
    ).eval()  # fmt: skip
    latent = torch.randn(2, 4, 4, 8, 10)  # batch 2; grid (4, 4, 5) after the (1, 2, 2) patch
    encoder = torch.randn(2, 7, 8)

    def run(timestep: int = 500) -> torch.Tensor:
        with torch.no_grad():
            return model(latent, timestep=torch.tensor([timestep] * 2), encoder_hidden_states=encoder)[0]

    yield model, run, (4, 4, 5)
    if hasattr(model, "_sparse_attn_diffusers"):
        unpatch_diffusers(model)


# Equality with the unpatched model and with the manual computation ---------------------------------
def test_import_sparse_attn_loads_neither_diffusers_nor_the_adapter():
    code = (
        "import sys\n"
        "import sparse_attn as sa\n"
        "assert 'diffusers' not in sys.modules and 'sparse_attn.integrations.diffusers' not in sys.modules\n"
        "assert {'patch_diffusers', 'unpatch_diffusers'} <= set(dir(sa)) & set(sa.__all__)\n"
        "import sparse_attn.integrations.diffusers as adapter\n"
        "assert sa.patch_diffusers is adapter.patch_diffusers and sa.unpatch_diffusers is adapter.unpatch_diffusers\n"
        "assert not {'diffusers', 'transformers'} & set(sys.modules), 'the adapter imports its library lazily'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_flux_full_window_equals_the_unpatched_model_and_restores(flux):
    model, run, grid, text = flux
    originals = dict(model.attn_processors)
    dense = run()
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=grid, text_tokens=text, text_position="before")
    assert handle.layer_names == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert all(isinstance(p, SparseAttnProcessor) for p in model.attn_processors.values())
    with handle.record() as rec:
        out = run()
    torch.testing.assert_close(out, dense, **TOLERANCE)
    # The double-stream block's joint call and the single-stream block's self-attention call both ran the method.
    assert [(r.name, r.kind, r.seq_q, r.text_tokens) for r in rec.records] == [
        ("transformer_blocks.0.attn", "sparse", 38, 3),
        ("single_transformer_blocks.0.attn", "sparse", 38, 3),
    ]
    assert all(r.density == 1.0 for r in rec.records) and "neighborhood" in rec.table()
    handle.unpatch()
    assert not handle.active and dict(model.attn_processors) == originals
    assert torch.equal(run(), dense)
    handle.unpatch()  # a second unpatch changes nothing
    with pytest.raises(ValueError, match="not patched"):
        unpatch_diffusers(model)


def test_a_method_without_layout_options_needs_no_grid(flux):
    model, run, _, _ = flux
    dense = run()
    handle = sa.patch_diffusers(model, "dense")
    try:
        with handle.record() as rec:
            out = run()
    finally:
        handle.unpatch()
    torch.testing.assert_close(out, dense, **TOLERANCE)
    assert [(r.kind, r.method, r.text_tokens) for r in rec.records] == [("sparse", "dense", 3), ("sparse", "dense", 0)]


def test_flux_window_equals_masked_sdpa_with_text_before(flux, monkeypatch):
    model, run, grid, text = flux
    dense = run()
    handle = sa.patch_diffusers(
        model, "neighborhood", grid=grid, window=3, text_tokens=text, text_position="before", block_q=16, block_k=16
    )
    try:
        out = run()
    finally:
        handle.unpatch()
    expected = manual(monkeypatch, run, natten_mask(grid, (3, 3), text, "before"))
    torch.testing.assert_close(out, expected, **TOLERANCE)
    assert (out - dense).abs().max() > 1e-3


def test_wan_3d_window_equals_masked_sdpa_and_cross_attention_stays_dense(wan, monkeypatch):
    model, run, grid = wan
    dense = run()
    assert attention_layers(model) == ["blocks.0.attn1", "blocks.1.attn1"]  # attn2 (cross-attention) is not wrapped
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=(3, 3, 3), block_q=32, block_k=32)
    try:
        with handle.record() as rec:
            out = run()
    finally:
        handle.unpatch()
    expected = manual(monkeypatch, run, natten_mask(grid, (3, 3, 3), 0, "after"))
    torch.testing.assert_close(out, expected, **TOLERANCE)
    assert (out - dense).abs().max() > 1e-3
    assert [(r.name, r.kind, r.seq_q, r.text_tokens) for r in rec.records] == [
        ("blocks.0.attn1", "sparse", 80, 0),
        ("blocks.1.attn1", "sparse", 80, 0),
    ]
    assert all(0.0 < r.density < 1.0 for r in rec.records)


def test_cross_attention_inside_a_wrapped_processor_runs_the_original_sdpa(wan, monkeypatch):
    """A wrapped module's call whose keys come from encoder_hidden_states is computed by SDPA, unchanged."""
    model, run, grid = wan
    dense = run()
    monkeypatch.setattr(model.blocks[0].attn2, "is_cross_attention", False)  # now wrapped like a self-attention module
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=grid, layers=["blocks.0.attn2"])
    try:
        with handle.record() as rec:
            out = run()
    finally:
        handle.unpatch()
    assert torch.equal(out, dense)
    assert [(r.kind, r.seq_q, r.seq_k, r.reason) for r in rec.records] == [("dense", 80, 7, "cross-attention")]


def test_hunyuan_video_key_padding_mask_and_text_after(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, guidance_embeds=False, text_embed_dim=8,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()  # fmt: skip
    grid, text = (3, 4, 5), 6
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 8, 10),
        timestep=torch.tensor([500, 500]),
        encoder_hidden_states=torch.randn(2, text, 8),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),  # row 0: 2 padded
        pooled_projections=torch.randn(2, 8),
    )

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    dense = run()
    # The text refiner (layer 0) attends over text only: left out.
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=grid, text_position="after", layers=[1, 2])
    with handle.record() as rec:
        torch.testing.assert_close(run(), dense, **TOLERANCE)
    # Per batch row, the kept tokens (grid + unpadded text) ran the method.
    assert [(r.layer, r.seq_q, r.text_tokens) for r in rec.records] == [(1, 64, 4), (1, 66, 6), (2, 64, 4), (2, 66, 6)]
    handle = sa.patch_diffusers(
        model, "neighborhood", grid=grid, window=(1, 3, 3), text_position="after", layers=[1, 2]
    )
    try:
        out = run()
    finally:
        handle.unpatch()
    expected = manual(monkeypatch, run, natten_mask(grid, (1, 3, 3), text, "after"))
    torch.testing.assert_close(out, expected, **TOLERANCE)
    assert (out - dense).abs().max() > 1e-3


def test_a_method_with_a_layer_option_gets_each_module_its_position(wan, monkeypatch):
    """vmoba cycles its 1D/2D/3D partitions over layers: the two patched modules are its layers 0 and 1."""
    model, run, grid = wan
    options = dict(chunk_1d=2, chunk_2d=(2, 5), threshold=0.5)
    with pytest.raises(ValueError, match="chunk_2d"):  # layer 1's partition is checked at patch time
        sa.patch_diffusers(model, "vmoba", grid=grid, chunk_1d=2, chunk_2d=(3, 3))
    handle = sa.patch_diffusers(model, "vmoba", grid=grid, **options)
    try:
        out = run()
    finally:
        handle.unpatch()
    layers = []

    def vmoba_sdpa(query, key, value, attn_mask=None, **kwargs):
        if query.shape[-2] != key.shape[-2]:
            return SDPA(query, key, value, attn_mask=attn_mask, **kwargs)
        layers.append(len(layers) % 2)
        return sa.sparse_attention(query, key, value, "vmoba", causal=False, grid=grid, layer=layers[-1], **options)

    with monkeypatch.context() as patched:
        patched.setattr(F, "scaled_dot_product_attention", vmoba_sdpa)
        expected = run()
    assert layers == [0, 1]
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_gradients_flow_through_the_method_as_through_masked_sdpa(wan, monkeypatch):
    model, _, grid = wan
    latent = torch.randn(1, 4, 4, 8, 10, requires_grad=True)
    encoder = torch.randn(1, 7, 8)
    weight = model.blocks[0].attn1.to_q.weight

    def gradients() -> tuple[torch.Tensor, torch.Tensor]:
        out = model(latent, timestep=torch.tensor([500]), encoder_hidden_states=encoder)[0]
        return torch.autograd.grad(out.square().sum(), (latent, weight))

    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=(3, 3, 3), block_q=32, block_k=32)
    try:
        patched = gradients()
    finally:
        handle.unpatch()
    with monkeypatch.context() as masked:
        masked.setattr(F, "scaled_dot_product_attention", masked_sdpa(natten_mask(grid, (3, 3, 3), 0, "after")))
        expected = gradients()
    for got, want in zip(patched, expected, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


class SoftmaxProcessor:
    """Self-attention written out (no SDPA call), as older or third-party processors do."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = (
            p(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v)
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2))


class WeightedProcessor(torch.nn.Module):
    """A processor with weights (an nn.Module, like IP-Adapter's): left unwrapped."""

    def __init__(self, processor) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.inner = processor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.gain * self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def test_processors_without_sdpa_or_with_weights_stay_dense_with_one_warning(wan):
    model, run, grid = wan
    first, second = model.blocks[0].attn1, model.blocks[1].attn1
    originals = (first.processor, second.processor)
    first.set_processor(SoftmaxProcessor())
    second.set_processor(WeightedProcessor(originals[1]))
    try:
        dense = run()
        with pytest.warns(UserWarning, match=r"processors with weights .* stay dense: \['blocks.1.attn1'\]"):
            handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=3)
        assert handle.layer_names == ["blocks.0.attn1"]
        with pytest.warns(UserWarning, match="SoftmaxProcessor .* without torch.nn.functional.scaled_dot_product"):
            out = run()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per patch
            run()
        handle.unpatch()
        assert torch.equal(out, dense)
    finally:
        first.set_processor(originals[0])
        second.set_processor(originals[1])


# Steps, layers -------------------------------------------------------------------------------------
def test_dense_steps_follow_the_timestep(wan, monkeypatch):
    model, run, grid = wan
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=(1, 3, 3), dense_steps=1)
    try:
        assert handle.step is None
        outputs, steps = [], []
        with handle.record() as rec:
            for timestep in (900, 900, 800, 1000):  # a step, its CFG twin, the next step, a new generation
                outputs.append(run(timestep))
                steps.append(handle.step)
    finally:
        handle.unpatch()
    assert steps == [0, 0, 1, 0]
    assert rec.dense_steps_seen == {0: 3} and {r.step for r in rec.records} == {1}
    mask = natten_mask(grid, (1, 3, 3), 0, "after")
    torch.testing.assert_close(outputs[0], run(900), **TOLERANCE)
    torch.testing.assert_close(outputs[2], manual(monkeypatch, run, mask, timestep=800), **TOLERANCE)
    torch.testing.assert_close(outputs[3], run(1000), **TOLERANCE)


def test_layers_choose_the_wrapped_modules(wan):
    model, run, grid = wan
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=3, layers=[-1])
    try:
        assert handle.layer_names == ["blocks.1.attn1"]
        assert not isinstance(model.blocks[0].attn1.processor, SparseAttnProcessor)
        with handle.record() as rec:
            run()
        assert {r.name for r in rec.records} == {"blocks.1.attn1"}
        # Patching again replaces the settings (and restores the first patch's processors first).
        again = sa.patch_diffusers(model, "neighborhood", grid=grid, window=3, layers=["blocks.0.attn1"])
        assert not handle.active and again.layer_names == ["blocks.0.attn1"]
        assert not isinstance(model.blocks[1].attn1.processor, SparseAttnProcessor)
    finally:
        unpatch_diffusers(model)


# Bad input --------------------------------------------------------------------------------------------
def test_a_grid_that_is_not_the_token_count_raises_naming_grid(wan, flux):
    model, run, _ = wan
    handle = sa.patch_diffusers(model, "neighborhood", grid=(4, 4, 4), window=3)
    try:
        with pytest.raises(ValueError, match=r"grid=\(4, 4, 4\) has 64 tokens, but blocks.0.attn1's attention has 80"):
            run()
    finally:
        handle.unpatch()
    model, run, grid, text = flux
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=3, text_position="before")
    try:  # the single-stream block concatenates the text itself: it needs text_tokens=
        with pytest.raises(ValueError, match="grid=.*single_transformer_blocks.0.attn.*text_tokens="):
            run()
    finally:
        handle.unpatch()
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=3, text_tokens=text)
    try:
        with pytest.raises(ValueError, match="text_position='before' or 'after'"):
            run()
    finally:
        handle.unpatch()
    handle = sa.patch_diffusers(model, "neighborhood", grid=grid, window=3, text_tokens=5, text_position="before")
    try:
        with pytest.raises(ValueError, match="text_tokens=5, but transformer_blocks.0.attn runs joint attention"):
            run()
    finally:
        handle.unpatch()


@pytest.mark.parametrize(
    "arguments, error, match",
    [
        (dict(window=3), ValueError, "needs the token grid"),
        (dict(grid=(4, 4, 5), no_such_option=1), TypeError, "no_such_option"),
        (dict(grid=(4, 4, 5), window=7), ValueError, "window"),
        (dict(grid=(4, 4, 5), window=3, layers=[5]), ValueError, "layers: index 5 is out of range"),
        (dict(grid=(4, 4, 5), window=3, layers=["blocks.0.attn2"]), ValueError, "not a self/joint attention module"),
        (dict(grid=(4, 4, 5), dense_steps=-1), ValueError, "dense_steps"),
        (dict(grid=(4, 4, 5), text_position="middle"), ValueError, "text_position"),
    ],
)
def test_bad_arguments_raise_at_patch_time(wan, arguments, error, match):
    model, _, _ = wan
    with pytest.raises(error, match=match):
        sa.patch_diffusers(model, "neighborhood", **arguments)
    assert not hasattr(model, "_sparse_attn_diffusers")
    with pytest.raises(TypeError, match="diffusers model"):
        sa.patch_diffusers("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", grid=(4, 4, 5))


# GPU --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "method, options",
    [("neighborhood", dict(window=(3, 5, 5))), ("sliding_tile", dict(tile=(2, 8, 8), window=(1, 3, 3)))],
)
def test_gpu_wan_bfloat16_matches_the_masked_reference(method, options, monkeypatch):
    """A Wan-like model at a 4K-token grid in bf16 on CUDA: the GPU backends against the reference backend, same calls."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=256,
    ).to("cuda", torch.bfloat16).eval()  # fmt: skip
    grid = (4, 32, 32)
    latent = torch.randn(1, 4, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    encoder = torch.randn(1, 16, 32, device="cuda", dtype=torch.bfloat16)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(latent, timestep=torch.tensor([500], device="cuda"), encoder_hidden_states=encoder)[0]

    handle = sa.patch_diffusers(model, method, grid=grid, **options)
    try:
        with handle.record() as rec:
            out = run()
    finally:
        handle.unpatch()
    calls = []

    def reference_sdpa(query, key, value, attn_mask=None, **kwargs):
        if query.shape[-2] == key.shape[-2] == 4096:  # self-attention: the method on the reference backend
            calls.append(query.shape)
            return sa.sparse_attention(
                query, key, value, method, causal=False, grid=grid, backend="reference", **options
            )
        return SDPA(query, key, value, attn_mask=attn_mask, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(F, "scaled_dot_product_attention", reference_sdpa)
        expected = run()
    assert [r.kind for r in rec.records] == ["sparse", "sparse"] and len(calls) == 2
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)
