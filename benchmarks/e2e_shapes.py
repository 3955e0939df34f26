"""End to end on model shapes with random weights (GPU): 8B-shaped Llama TTFT, decode tokens/s.

Random weights: speed only. The models are built from a config (``transformers``' own
classes), initialized on the device in their dtype, and never load a checkpoint: nothing here
says anything about accuracy. Random weights also give unstructured q/k, on which estimators
would keep most blocks, so prefill is driven by fixed-density patterns, and the estimators'
cost is added from their own measurement (issue 18 item 6).

Shapes (``--shapes``; the config values are the real models'):

* ``llama-8b``: Llama 3 8B's shape: 32 layers, hidden 4096, 32 query / 8 KV heads, head_dim
  128, MLP 14336, vocab 128256, RoPE theta 500000 (plain RoPE: Llama 3.1's frequency
  rescaling changes no cost), 131072 positions, untied embeddings.
* ``smollm2-135m``: SmolLM2-135M (Llama): 30 layers, hidden 576, 9 / 3 heads, head_dim 64,
  MLP 1536, vocab 49152, theta 100000, tied embeddings.
* ``gemma3-270m``: Gemma 3 270M through ``Gemma3TextConfig``: 18 layers in its 5-sliding-to-1
  pattern (layers 5, 11, 17 global, the rest a 512-token window), hidden 640, 4 / 1 heads,
  head_dim 256, MLP 2048, vocab 262144, tied embeddings.
* ``tiny-llama``, ``tiny-gemma3`` (``--quick``): 4 layers, hidden 256, for CPU runs.

The small models' configs are those of the converted embedded checkpoints
(``sparse_attn.models``); ``max_position_embeddings`` is raised to the longest prompt plus the
new tokens where it is shorter (plain RoPE has no length limit; speed does not change).

**TTFT** (``--only ttft``; default shape ``llama-8b`` at 32K / 64K / 128K): one forward of the
prompt with the KV cache on (a fresh ``DynamicCache``), ``logits_to_keep=1`` (the first
token's logits), no grad; the median of ``--repeats`` timed forwards (CUDA synchronized)
after one warm-up forward. Configurations:

* ``sdpa``: the unpatched model (transformers' SDPA). With no padding and no attention mask
  transformers hands SDPA ``is_causal=True`` and no mask; the script checks that on the first
  full-attention layer (``sdpa_mask`` in the JSON), so no ``S x S`` mask is built. (The Gemma 3
  shape's sliding layers do get transformers' dense windowed mask, ``S x S`` booleans.)
* ``no-attn``: attention replaced by a no-op that returns zeros of the output shape (registered
  in transformers' ``AttentionInterface``; no mask is built for it). Everything else (QKV and
  output projections, RoPE, the KV cache, MLPs, norms, embedding and the last logits) runs.
  Each configuration's attention time is its TTFT minus this one, and its attention share
  that over its TTFT (attention includes the pattern's construction for the patched rows).
  Chosen over CUDA events around the attention modules: no per-layer synchronization
  perturbs the timed forwards.
* ``random`` at each ``--densities`` (``sa.patch(model, "random", density=d)``: seeded random
  blocks per KV head, diagonal kept) and ``tri_shape`` (SCBench's A-shape plus dense last
  queries; its density is set by ``local_tokens``, chosen per length as the multiple of the
  block size whose pattern density is nearest to ``d``; sinks 128 and last queries 100 are its
  defaults). The warm-up forward runs under ``sa.record``, which gives the measured density
  (mean over layers) and the pattern's build time (``pattern ms``, summed over layers).
* ``with estimation`` (``--estimation-json``, a JSON written by ``benchmarks/estimators.py``
  in the same session, rows at 32 query / 8 KV heads, head_dim 128): per estimator in that
  file, the ``random`` row's TTFT plus ``n_layers x`` the estimator's measured ``estimate_ms``
  at that length. The random pattern's own build time stays in, so this is an upper bound.
  Lengths the file does not measure get no number. The pattern of a real estimator on real
  q/k has its own density; this column prices estimation at the row's density.

**Decode** (``--only decode``; default shapes ``llama-8b``, ``smollm2-135m``, ``gemma3-270m``,
prompts of 16K and 32K tokens): ``model.generate`` of ``--new-tokens`` tokens (greedy,
``min_new_tokens`` equal, so EOS does not stop it) after a random-token prompt, one warm-up
``generate`` of 4 tokens on the same prompt first. Configurations: ``sdpa`` (unpatched,
transformers' ``DynamicCache``) and, on ``SparseDecodeCache`` (16-token pages), ``paged-dense``
(decode method ``dense``: the split-K paged kernel over every page) and each
``--decode-methods`` at ``token_budget`` ``--token-budget`` (default quest / tidaldecode /
streaming at 2048, their other options at their defaults). The patched configurations'
prefill is exact: ``sa.patch(model, "dense", dense_layers=<every full-attention layer>)`` runs
causal SDPA there (sliding layers: exact windowed attention), so only decode differs from
``sdpa``. A logits processor stamps the time (synchronized) at each generated token: prefill
s is generate's start to the first token; ``ms/step`` is the median interval between later
tokens; decode tokens/s is the tokens after the first over their time; e2e tokens/s counts
all tokens over the whole call. CUDA graphs: not used. ``SparseDecodeCache`` does not
support static shapes (its docstring says so), so every row runs eagerly; the ``sdpa`` row too,
for a like-for-like comparison.

``--quick`` runs the tiny shapes on CPU in float32 in seconds (TTFT at 512 tokens; decode of 8
tokens after 512 with budget 128; 64-token blocks; the reference backend), and first checks
that a patched model whose pattern keeps every block (``random`` at density 1.0 and
``tri_shape`` with a window over the whole prompt) gives the unpatched model's logits at every
position (``meta.checks`` in the JSON), with ``sa.record`` showing each full-attention layer
ran the method. ``--budget`` bounds the whole run in seconds: configurations not started in
time are skipped and listed (``meta.skipped``). Results are written after every row.

    python benchmarks/e2e_shapes.py --only ttft --lengths 131072 --estimation-json est.json
    python benchmarks/e2e_shapes.py --only decode --shapes llama-8b --budget 500
    python benchmarks/e2e_shapes.py --quick          # CPU, seconds (no JSON unless --output)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList

import sparse_attn as sa
from sparse_attn.bench import device_slug, environment, format_table, write_results
from sparse_attn.integrations.cache import cache_keyword
from sparse_attn.integrations.decode import SparseDecodeCache

NOTE = "random weights: speed only"
NOOP_ATTENTION = "e2e_shapes_noop"

SHAPES = {
    "llama-8b": (
        "llama",
        dict(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
            tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        ),
    ),
    "smollm2-135m": (
        "llama",
        dict(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    ),
    "gemma3-270m": (
        "gemma3",
        dict(
            vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
            num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
            sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        ),
    ),
    "tiny-llama": (
        "llama",
        dict(
            vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
            bos_token_id=1, eos_token_id=2, pad_token_id=2,
        ),
    ),
    "tiny-gemma3": (
        "gemma3",
        dict(
            vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
            sliding_window=128, layer_types=["sliding_attention"] * 3 + ["full_attention"],
            query_pre_attn_scalar=64, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        ),
    ),
}  # fmt: skip

TTFT_COLUMNS = [
    ("shape", "shape", "s"),
    ("length", "length", "d"),
    ("config", "config", "s"),
    ("target_density", "target d", ".2f"),
    ("density", "density", ".3f"),
    ("ttft_ms", "TTFT ms", ".1f"),
    ("speedup_vs_sdpa", "x sdpa", ".2f"),
    ("attention_ms", "attn ms", ".1f"),
    ("attention_share", "attn share", ".3f"),
    ("pattern_ms", "pattern ms", ".1f"),
    ("peak_gib", "peak GiB", ".1f"),
]

DECODE_COLUMNS = [
    ("shape", "shape", "s"),
    ("prompt", "prompt", "d"),
    ("config", "config", "s"),
    ("token_budget", "budget", "d"),
    ("prefill_s", "prefill s", ".3f"),
    ("decode_tokens_per_s", "decode tok/s", ".1f"),
    ("ms_per_step", "ms/step", ".2f"),
    ("e2e_tokens_per_s", "e2e tok/s", ".1f"),
    ("speedup_vs_sdpa", "x sdpa", ".2f"),
    ("peak_gib", "peak GiB", ".1f"),
]


# ----------------------------------------------------------------------------- models


def build_model(shape: str, *, device: torch.device, dtype: torch.dtype, min_positions: int = 0):
    """A ``shape`` causal LM with random weights, created directly on ``device`` in ``dtype``."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    kind, values = SHAPES[shape]
    values = dict(values, max_position_embeddings=max(values["max_position_embeddings"], min_positions))
    if kind == "llama":
        config, model_class = transformers.LlamaConfig(**values), transformers.LlamaForCausalLM
    else:
        config, model_class = transformers.Gemma3TextConfig(**values), transformers.Gemma3ForCausalLM
    torch.manual_seed(0)
    # Parameters are allocated and initialized (transformers' normal init) on the device in dtype.
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    return model.eval()


def full_attention_layers(model) -> list[int]:
    """Layer indices that are not sliding-window layers."""
    config = model.config
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [layer for layer, kind in enumerate(types) if kind != "sliding_attention"]


def random_ids(model, length: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=generator).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def noop_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that computes nothing: zeros ``(B, L, Hq, D)``, the layout attention functions return."""
    batch, heads, length, dim = query.shape
    return query.new_zeros(batch, length, heads, dim), None


def tri_shape_local_tokens(length: int, density: float, *, block: int, device, dtype) -> tuple[int, float]:
    """The multiple of ``block`` whose ``tri_shape`` pattern (default sinks / last queries) at
    ``length`` tokens has the density nearest to ``density``, and that density (bisection: the
    density grows with the window)."""
    q = torch.zeros(1, 1, length, 8, device=device, dtype=dtype)

    def density_at(blocks: int) -> float:
        pattern = sa.estimate(q, q, "tri_shape", local_tokens=blocks * block, block_q=block, block_k=block)
        return pattern.density()

    low, high = 1, -(-length // block)
    while low < high:
        middle = (low + high) // 2
        if density_at(middle) < density:
            low = middle + 1
        else:
            high = middle
    candidates = {blocks: density_at(blocks) for blocks in {max(low - 1, 1), low}}
    best = min(candidates, key=lambda blocks: abs(candidates[blocks] - density))
    return best * block, candidates[best]


# ----------------------------------------------------------------------------- budget


class Budget:
    """Seconds for the whole run; ``allows(label)`` is False (and the label is kept) once spent."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start, self.skipped = seconds, time.perf_counter(), []

    def allows(self, label: str) -> bool:
        elapsed = time.perf_counter() - self.start
        if self.seconds is None or elapsed < self.seconds:
            return True
        self.skipped.append(f"{label} (budget of {self.seconds:.0f} s spent at {elapsed:.0f} s)")
        print(f"skipping {label}: the budget of {self.seconds:.0f} s is spent", flush=True)
        return False


# ----------------------------------------------------------------------------- TTFT


def timed_forwards(model, ids: torch.Tensor, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` prefill forwards (KV cache on, the last position's logits)."""
    samples = []
    for _ in range(repeats):
        synchronize(ids.device)
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        synchronize(ids.device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def sdpa_mask_seen(model, ids: torch.Tensor) -> str:
    """Runs one forward (the warm-up) and says what the first full-attention layer got as its mask
    (sliding-window layers of the unpatched model get a dense windowed mask: transformers' own)."""
    seen = []
    first = full_attention_layers(model)[0]
    module = next(
        m for m in model.modules() if type(m).__name__.endswith("Attention") and getattr(m, "layer_idx", None) == first
    )

    def hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append("none (SDPA is_causal)" if mask is None else f"tensor {tuple(mask.shape)} {mask.dtype}")

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids, use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    if seen[0] != "none (SDPA is_causal)":
        print(f"warning: the unpatched model's full-attention layer {first} got a mask: {seen[0]}", flush=True)
    return seen[0]


def estimation_costs(path: Path | None, model) -> tuple[dict[tuple[int, str], float], dict]:
    """``{(seq, method): estimate_ms}`` from an estimators.py JSON, rows of the model's head shape."""
    if path is None:
        return {}, {}
    data = json.loads(Path(path).read_text())
    config = model.config
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    costs = {}
    for row in data["rows"]:
        if (row.get("q_heads"), row.get("kv_heads"), row.get("head_dim")) != shape:
            continue
        if row.get("estimate_ms") is not None and row.get("inputs", "structured") == "structured":
            costs[(row["seq"], row["method"])] = row["estimate_ms"]
    return costs, {"path": str(path), "meta": data.get("meta", {})}


def ttft_configs(densities: list[float]) -> list[tuple[str, float | None]]:
    return [("sdpa", None), ("no-attn", None)] + [(m, d) for m in ("random", "tri_shape") for d in densities]


def run_ttft_length(model, shape: str, length: int, args, patch_options: dict, costs, budget, emit) -> None:
    device = next(model.parameters()).device
    ids = random_ids(model, length, device)
    layers = len(full_attention_layers(model))  # the layers an estimator would run on
    sdpa_ms = noop_ms = None
    for config, density in ttft_configs(args.densities):
        label = f"ttft {shape} {length} {config}" + ("" if density is None else f" d={density}")
        if not budget.allows(label):
            continue
        row = {"part": "ttft", "shape": shape, "length": length, "config": config, "target_density": density}
        options = {}
        if config == "random":
            options = {"density": density}
        elif config == "tri_shape":
            local, _ = tri_shape_local_tokens(
                length, density, block=patch_options["block_k"], device=device, dtype=model.dtype
            )
            options = {"local_tokens": local}
        row["options"] = options
        reset_peak(device)
        if config == "sdpa":
            row["sdpa_mask"] = sdpa_mask_seen(model, ids)  # the warm-up forward
            runs = timed_forwards(model, ids, args.repeats)
        elif config == "no-attn":
            previous = model.config._attn_implementation
            model.set_attn_implementation(NOOP_ATTENTION)
            try:
                model(ids, use_cache=True, logits_to_keep=1)
                runs = timed_forwards(model, ids, args.repeats)
            finally:
                model.set_attn_implementation(previous)
        else:
            sa.patch(model, config, **patch_options, **options)
            try:
                with sa.record(model) as recorder:  # the warm-up forward
                    model(ids, use_cache=True, logits_to_keep=1)
                records = [r for r in recorder.rows() if r["kind"] == "sparse"]
                if len(records) != len(full_attention_layers(model)):
                    raise RuntimeError(f"{config} ran on {len(records)} layers, expected every full-attention layer")
                row["density"] = statistics.mean(r["density"] for r in records)
                row["pattern_ms"] = sum(r["estimate_ms"] for r in records)
                runs = timed_forwards(model, ids, args.repeats)
            finally:
                sa.unpatch(model)
        row["ttft_runs_ms"] = runs
        row["ttft_ms"] = statistics.median(runs)
        row["peak_gib"] = peak_gib(device)
        if config == "sdpa":
            sdpa_ms, row["density"] = row["ttft_ms"], 1.0
        if config == "no-attn":
            noop_ms = row["ttft_ms"]
        if sdpa_ms is not None:
            row["speedup_vs_sdpa"] = sdpa_ms / row["ttft_ms"]
        if noop_ms is not None and config != "no-attn":
            row["attention_ms"] = row["ttft_ms"] - noop_ms
            row["attention_share"] = row["attention_ms"] / row["ttft_ms"]
        if config == "random":
            row["with_estimation_ms"] = {}
            for (seq, method), estimate_ms in sorted(costs.items()):
                if seq == length:
                    total = row["ttft_ms"] + layers * estimate_ms
                    row["with_estimation_ms"][method] = total
                    row[f"with_{method}_ms"] = total
                    if sdpa_ms is not None:
                        row[f"with_{method}_x"] = sdpa_ms / total
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if sdpa_ms is not None and noop_ms is not None:  # the sdpa row's share, now that no-attn is known
        emit.update(
            shape, length, "sdpa", attention_ms=sdpa_ms - noop_ms, attention_share=(sdpa_ms - noop_ms) / sdpa_ms
        )


# ----------------------------------------------------------------------------- decode


class StampEachToken(LogitsProcessor):
    """Records the (synchronized) time at each generated token; changes no score."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def timed_generate(model, ids: torch.Tensor, new_tokens: int, cache_factory) -> dict:
    device = ids.device
    keyword = cache_keyword(model)
    common = dict(attention_mask=torch.ones_like(ids), do_sample=False)

    def generate(tokens: int, stamp=None):
        extra = {} if cache_factory is None else {keyword: cache_factory()}
        processors = LogitsProcessorList([stamp] if stamp is not None else [])
        return model.generate(
            ids, max_new_tokens=tokens, min_new_tokens=tokens, logits_processor=processors, **common, **extra
        )

    generate(4)  # warm-up: the same prefill shape and the first decode steps
    stamp = StampEachToken(device)
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    out = generate(new_tokens, stamp)
    synchronize(device)
    end = time.perf_counter()
    produced = out.shape[1] - ids.shape[1]
    if produced != new_tokens or len(stamp.stamps) != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens ({len(stamp.stamps)} stamps), asked {new_tokens}")
    steps = [b - a for a, b in zip(stamp.stamps, stamp.stamps[1:], strict=False)]
    decode_s = stamp.stamps[-1] - stamp.stamps[0]
    return {
        "new_tokens": new_tokens,
        "prefill_s": stamp.stamps[0] - start,
        "decode_s": decode_s,
        "decode_tokens_per_s": len(steps) / decode_s if steps else None,
        "ms_per_step": statistics.median(steps) * 1e3 if steps else None,
        "e2e_tokens_per_s": new_tokens / (end - start),
        "peak_gib": peak_gib(device),
    }


def run_decode_prompt(model, shape: str, prompt: int, args, patch_options: dict, budget, emit) -> None:
    device = next(model.parameters()).device
    ids = random_ids(model, prompt, device)
    configs = [("sdpa", None), ("paged-dense", "dense")] + [(m, m) for m in args.decode_methods]
    # Exact prefill on every full-attention layer; sliding layers run exact windowed attention.
    prefill = dict(patch_options, dense_layers=full_attention_layers(model))
    sdpa = None
    for config, method in configs:
        label = f"decode {shape} {prompt} {config}"
        if not budget.allows(label):
            continue
        row = {"part": "decode", "shape": shape, "prompt": prompt, "config": config}
        if method is None:
            row.update(timed_generate(model, ids, args.new_tokens, None))
        else:
            options = {} if method == "dense" else {"token_budget": args.token_budget}
            row["token_budget"] = options.get("token_budget")
            sa.patch(model, "dense", **prefill, decode_method=method, decode_options=options)
            try:
                row.update(timed_generate(model, ids, args.new_tokens, lambda: SparseDecodeCache(model, page_size=16)))
            finally:
                sa.unpatch(model)
        sdpa = sdpa or (row["decode_tokens_per_s"] if config == "sdpa" else None)
        if sdpa and row["decode_tokens_per_s"]:
            row["speedup_vs_sdpa"] = row["decode_tokens_per_s"] / sdpa
        emit(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- checks (--quick)


def full_pattern_check(model, ids: torch.Tensor, patch_options: dict) -> list[dict]:
    """Patterns that keep every block must give the unpatched logits at every position.

    For ``random`` at density 1.0 and ``tri_shape`` with a window over the whole prompt:
    the largest absolute logit difference, the same relative to the largest logit, the
    layers that ran the method (from ``sa.record``) and their mean density.
    """
    expected = model(ids, use_cache=True).logits
    full_layers = full_attention_layers(model)
    results = []
    for method, options in (("random", {"density": 1.0}), ("tri_shape", {"local_tokens": ids.shape[1]})):
        sa.patch(model, method, **patch_options, **options)
        try:
            with sa.record(model) as recorder:
                got = model(ids, use_cache=True).logits
        finally:
            sa.unpatch(model)
        ran = [r for r in recorder.rows() if r["kind"] == "sparse" and r["method"] == method]
        difference = float((got - expected).abs().max())
        results.append(
            {
                "method": method,
                "options": options,
                "length": ids.shape[1],
                "max_abs_diff": difference,
                "max_rel_diff": difference / float(expected.abs().max()),
                "method_layers": sorted(r["layer"] for r in ran),
                "full_attention_layers": full_layers,
                "density": statistics.mean(r["density"] for r in ran) if ran else None,
            }
        )
    return results


# ----------------------------------------------------------------------------- main


class Emitter:
    """Collects rows, prints each, and rewrites the JSON after each one when a path is set."""

    def __init__(self, out: Path | None, meta: dict) -> None:
        self.out, self.meta, self.rows = out, meta, []

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        columns = TTFT_COLUMNS if row["part"] == "ttft" else DECODE_COLUMNS
        print(format_table([row], columns), flush=True)
        self.write()

    def update(self, shape: str, length: int, config: str, **values) -> None:
        for row in self.rows:
            if (row["part"], row["shape"], row.get("length"), row["config"]) == ("ttft", shape, length, config):
                row.update(values)
        self.write()

    def write(self) -> None:
        if self.out is not None:
            write_results(self.rows, self.out, self.meta)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["ttft", "decode"], default=None, help="run one half (default both)")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072], help="TTFT prompt lengths")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--repeats", type=int, default=3, help="timed TTFT forwards per configuration (median)")
    parser.add_argument("--estimation-json", type=Path, default=None, help="benchmarks/estimators.py output")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16384, 32768], help="decode prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--decode-methods", nargs="+", default=["quest", "tidaldecode", "streaming"])
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--backend", default="auto", help="block-sparse backend of the patched prefills")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run; later configs skip")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 512 tokens, float32: runs on CPU")
    parser.add_argument("--device", default=None, help="default cuda when available (else cpu, --quick only)")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default results/<gpu>/e2e_shapes*.json)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        parser.error("--densities must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns ``{"meta": ..., "rows": [...]}`` (also written to the JSON)."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick:
        raise SystemExit("benchmarks/e2e_shapes.py needs a CUDA GPU; on CPU run it with --quick")
    with torch.no_grad():
        return run(args, device)


def run(args, device: torch.device) -> dict:
    AttentionInterface.register(NOOP_ATTENTION, noop_attention)
    block = 128
    patch_options = {"backend": args.backend, "block_q": block, "block_k": block}
    if args.quick:
        block = 64
        args.lengths, args.prompts, args.repeats = [512], [512], min(args.repeats, 2)
        args.new_tokens, args.token_budget = min(args.new_tokens, 8), min(args.token_budget, 128)
        patch_options = {"backend": args.backend, "block_q": block, "block_k": block, "min_seq_len": 64}
        if device.type == "cpu" and args.backend == "auto":
            patch_options["backend"] = "reference"  # FlexAttention would compile for minutes on a CPU
    dtype = torch.float32 if args.quick else torch.bfloat16
    ttft_shapes = args.shapes or (["tiny-llama"] if args.quick else ["llama-8b"])
    decode_shapes = args.shapes or (
        ["tiny-llama", "tiny-gemma3"] if args.quick else ["llama-8b", "smollm2-135m", "gemma3-270m"]
    )
    parts = [args.only] if args.only else ["ttft", "decode"]
    out = args.output
    if out is None and not args.quick:
        name = "e2e_shapes" + (f"_{args.only}" if args.only else "") + ".json"
        out = Path(__file__).parent / "results" / device_slug(device) / name
    meta = {
        "benchmark": "e2e_shapes",
        "note": NOTE,
        "dtype": str(dtype).removeprefix("torch."),
        "parts": parts,
        "repeats": args.repeats,
        "patch_options": patch_options,
        "new_tokens": args.new_tokens,
        "decode_page_size": 16,
        "cuda_graphs": "not used: SparseDecodeCache does not support static shapes; every decode row runs eagerly",
        "attention_share": "1 - TTFT(no-op attention) / TTFT, the no-op returning zeros of the output shape",
        "skipped": [],
        **environment(device),
    }
    emit = Emitter(out, meta)
    budget = Budget(args.budget)
    meta["skipped"] = budget.skipped
    print(f"{NOTE}. device {device}, dtype {dtype}", flush=True)

    if args.quick:
        meta["checks"] = []
        for shape in sorted(set(ttft_shapes + decode_shapes)):
            model = build_model(shape, device=device, dtype=dtype)
            meta["checks"] += [
                dict(check, shape=shape)
                for check in full_pattern_check(model, random_ids(model, 300, device, seed=1), patch_options)
            ]
        for check in meta["checks"]:
            print(f"check {check['shape']} {check['method']}: max |patched - unpatched| logits {check['max_abs_diff']:.2e} "
                  f"(relative {check['max_rel_diff']:.2e}) on layers {check['method_layers']}")  # fmt: skip

    if "ttft" in parts:
        for shape in ttft_shapes:
            model = build_model(shape, device=device, dtype=dtype, min_positions=max(args.lengths))
            costs, source = estimation_costs(args.estimation_json, model)
            meta["estimation_source"] = source or "none (no --estimation-json)"
            for length in args.lengths:
                run_ttft_length(model, shape, length, args, patch_options, costs, budget, emit)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "decode" in parts:
        for shape in decode_shapes:
            model = build_model(shape, device=device, dtype=dtype, min_positions=max(args.prompts) + args.new_tokens)
            for prompt in args.prompts:
                run_decode_prompt(model, shape, prompt, args, patch_options, budget, emit)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    emit.write()
    ttft_rows = [row for row in emit.rows if row["part"] == "ttft"]
    if ttft_rows:
        methods = sorted({m for row in ttft_rows for m in row.get("with_estimation_ms", {})})
        columns = TTFT_COLUMNS + [(f"with_{m}_x", f"x sdpa w/ {m}", ".2f") for m in methods]
        print(f"\nTime to first token ({NOTE}; 'x sdpa w/ <estimator>': the random row plus that estimator's cost)")
        print(format_table(ttft_rows, columns))
        for row in ttft_rows:
            if row["config"] == "random" and row["target_density"] == 0.1 and row.get("with_estimation_ms"):
                speedups = ", ".join(f"{m} {row[f'with_{m}_x']:.2f}x" for m in sorted(row["with_estimation_ms"]))
                print(
                    f"{row['shape']} {row['length']}: density 0.1 with estimation vs sdpa: {speedups} (target >= 2.5x)"
                )
    decode_rows = [row for row in emit.rows if row["part"] == "decode"]
    if decode_rows:
        print(f"\nDecode, {args.new_tokens} new tokens, batch 1 ({NOTE})")
        print(format_table(decode_rows, DECODE_COLUMNS))
    if budget.skipped:
        print(f"skipped ({len(budget.skipped)}): " + "; ".join(budget.skipped))
    if out is not None:
        print(f"wrote {out}")
    return {"meta": meta, "rows": emit.rows}


if __name__ == "__main__":
    main()
