"""Recall against density of every prefill estimator, ``seer`` and ``auto``, on the real models' own q/k.

Issue 18 asks two questions this script answers on the CPU:

* does ``auto`` meet its recall budget on >= 95 % of heads at lower density than the best single
  method-setting that meets that recall on >= 95 % of heads?
* does ``seer`` (the shipped gates: SmolLM2's, Gemma 3's) keep as much attention mass as
  ``xattention`` at equal density?

Both are judged on the TRUE recall of ALL queries, not on the last-query probe ``auto`` selects with.

1. Capture (once; cached under ``--cache``, default ``/tmp/sparse_attn_recall_frontier``, not in
   the repository): the embedded model reads a ``niah`` prompt (pydoc haystack, one needle at
   depth 0.5, seed 0) in float32 on the CPU, every layer patched dense (exact SDPA) inside
   ``sa.record(model, capture=True)``; the post-RoPE q and k of the chosen global layers are
   saved. SmolLM2-135M at 8K (all 30 layers are global; ``--smollm2-layers`` picks them, default
   every third: 0, 3, ..., 27), Gemma 3 270M at 16K (its global layers 5, 11, 17).
2. Per layer and method-setting (:func:`settings`): the pattern from ``sa.estimate`` with 128 x 128
   blocks (``seer`` uses its gates' 64 x 64 blocks, ``moba`` token-level rows: each pattern carries
   its geometry), and per query head its density (computed blocks over causally valid blocks, in
   the pattern's own geometry, as ``sa.record`` reports it) and its true recall
   (:func:`head_recall`: the exact softmax mass inside the kept blocks, averaged over every
   query; float32, chunked over query blocks).
3. Report, per model: (a) per method-setting the mean density and recall over all heads of all
   captured layers, and the share of heads with recall >= 0.9 / 0.95; (b) per target recall 0.9 /
   0.95 the cheapest single method-setting (lowest mean density) meeting it on >= 95 % of heads
   against ``auto(recall=target)``: its mean density, its share of heads meeting the target, and
   the per-head oracle (per head, the cheapest of ``auto``'s candidates meeting the target on the
   true recall: what a perfect probe would reach); (c) ``seer`` against ``xattention`` at equal
   density (each model with shipped gates): ``xattention``'s recall interpolated at each ``seer``
   setting's density.
   Also, per ``auto`` setting, the probe recall it saw against the true recall of its choice and,
   per candidate it chose, how many heads missed the target; and ``auto``'s rule replayed offline
   with other probes (:func:`simulate_selection`: 8 or 16 evenly spaced query chunks instead of
   the last one, and a one-sided 95 % lower bound of the chunk mean), from each candidate's exact
   per-chunk recall, to test whether the last-query probe is what makes ``auto`` miss.

Every registered training-free prefill estimator of text models is included at its defaults and
2-3 settings spanning density, plus ``dense`` (the trivial answer) and ``random`` (a
non-estimator baseline). Not included: ``pbs`` (a wrapper running two attentions, not a
registered pattern) and the video/image methods (they need a token grid). ``auto`` runs with its default candidates,
which are all among the settings, so their true recall per head is known (the oracle above).

Caveats, also written into the JSON's ``meta``: one prompt per model; the ``seer`` gates were
trained on the same pydoc text (SmolLM2's also on KJV and essays) the haystack is drawn from, so its numbers are
in-distribution; density at 64-blocks (``seer``) and token rows (``moba``) is finer-grained than
at 128-blocks, which favours them at equal density.

Writes ``benchmarks/results/cpu/recall_frontier.json`` and ``recall_frontier.png`` (recall against
density, one colour per method, ``auto`` highlighted).

    python benchmarks/recall_frontier.py                 # full run: ~16 min on 2 CPU threads + ~5 min per model capture
    python benchmarks/recall_frontier.py --quick         # one SmolLM2 layer at 2K (smoke test, no files unless --out)
    python benchmarks/recall_frontier.py --from-results benchmarks/results/cpu/recall_frontier.json  # re-derive

Held out (``auto``'s spread probe was chosen on the niah prompt above; these are other prompts):
``--smollm2-prompt`` / ``--gemma-prompt`` take prompts as ``TASK:DEPTH:SEED`` (several: each its
own case), ``--auto-probes last spread`` runs ``auto`` once per probe, ``--only-candidates`` keeps
``dense`` and ``auto``'s candidates only (``best_single`` is then the cheapest candidate), and
``meta.auto_cases`` counts, per probe, the (model, prompt, target) cases meeting the budget on
>= 95 % of heads. ``auto``'s candidates reuse the patterns the layer already estimated.

    python benchmarks/recall_frontier.py --auto-probes last spread --only-candidates \\
        --smollm2-prompt variable_tracking:0.2:1 niah:0.8:2 --gemma-prompt niah:0.8:1 variable_tracking:0.2:2 \\
        --out benchmarks/results/cpu/recall_frontier_holdout.json  # ~12 min on 2 threads + ~3.5 min per capture
"""

from __future__ import annotations

import argparse
import functools
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import torch

import sparse_attn as sa
import sparse_attn.methods.auto as auto_module
from sparse_attn.bench import environment, format_table, write_results
from sparse_attn.geometry import causal_block_mask
from sparse_attn.methods.auto import DEFAULT_CANDIDATES, choose, label
from sparse_attn.methods.seer import shipped_gates_path
from sparse_attn.pattern import BlockSparsePattern

BLOCK = 128
TARGETS = (0.9, 0.95)
HEAD_SHARE = 0.95
RESULTS = Path(__file__).resolve().parent / "results" / "cpu"
DEFAULT_CACHE = Path("/tmp/sparse_attn_recall_frontier")
SMOLLM2_LAYERS = tuple(range(0, 30, 3))

# The settings beside each method's defaults: chosen to span density at 8K-16K tokens.
SPREAD: tuple[tuple[str, dict], ...] = (
    ("dense", {}),
    ("streaming", {}),
    ("streaming", {"sink_tokens": 128, "local_tokens": 1024}),
    ("streaming", {"sink_tokens": 128, "local_tokens": 2048}),
    ("power", {}),
    ("power", {"sink_tokens": 128, "local_tokens": 512}),
    ("power", {"sink_tokens": 256, "local_tokens": 2560}),
    ("tri_shape", {}),
    ("tri_shape", {"local_tokens": 1024}),
    ("strided_shards", {}),
    ("strided_shards", {"stride": 4}),
    ("strided_shards", {"stride": 16}),
    ("moa", {}),
    ("moa", {"alpha": 512.0, "beta": 0.1}),
    ("moa", {"alpha": 2048.0, "beta": 0.5}),
    ("block_topk", {}),
    ("block_topk", {"top_k": 8}),
    ("block_topk", {"top_k": 16}),
    ("block_topk", {"top_k": 32}),
    ("block_topk", {"top_k": 64}),
    ("block_topk", {"top_k": 100, "threshold": 0.95}),
    ("vertical_slash", {}),
    ("vertical_slash", {"vertical_size": 500, "slash_size": 1000}),
    ("vertical_slash", {"vertical_size": 250, "slash_size": 500}),
    ("xattention", {"threshold": 0.8}),
    ("xattention", {"threshold": 0.9}),
    ("xattention", {"threshold": 0.95}),
    ("flexprefill", {"gamma": 0.8}),
    ("flexprefill", {"gamma": 0.9}),
    ("flexprefill", {"gamma": 0.95}),
    ("proxyattn", {}),
    ("proxyattn", {"gamma": 0.8}),
    ("proxyattn", {"gamma": 0.95}),
    ("anchor", {}),
    ("anchor", {"theta": 8.0}),
    ("anchor", {"theta": 16.0}),
    ("hip", {}),
    ("hip", {"top_k_tokens": 256}),
    ("hip", {"top_k_tokens": 1024}),
    ("sale", {}),
    ("sale", {"threshold": 0.001}),
    ("sale", {"threshold": 0.016}),
    ("moba", {}),
    ("moba", {"block_size": 512, "top_k": 3}),
    ("moba", {"block_size": 1024, "top_k": 2}),
    ("random", {"density": 0.1, "per_query_head": True}),
    ("random", {"density": 0.3, "per_query_head": True}),
)
SEER_SETTINGS: tuple[dict, ...] = (
    {},
    {"threshold": 5e-4},
    {"threshold": 5e-3},  # with the default (2e-3), the densities of xattention's thresholds on Gemma at 16K
    {"threshold": 1e-2},
    {"top_k": 8},
    {"top_k": 16},
    {"top_k": 32},
)
# Models with shipped ``seer`` gates (SmolLM2's, and Gemma 3's global layers since the eighth session).
GATED_MODELS = tuple(name for name in ("smollm2-135m", "gemma3-270m") if shipped_gates_path(name).is_file())


def settings(
    model: str, *, auto: bool = True, probes: Sequence[str] | None = None, only_candidates: bool = False
) -> list[tuple[str, dict]]:
    """``(method, options)`` per method-setting for ``model``: :data:`SPREAD`, ``auto``'s candidates
    not already there, ``seer`` where gates are shipped, ``auto`` at each target recall.

    ``probes``: ``auto`` once per target and probe, with ``probe`` set explicitly (None: ``auto`` at
    its default probe, option not set). ``only_candidates``: ``dense`` and ``auto``'s default
    candidates only (no other settings, no ``seer``): enough for ``auto`` against its candidates."""
    chosen = [("dense", {})] if only_candidates else list(SPREAD)
    labels = {label(name, options) for name, options in chosen}
    chosen += [(name, dict(options)) for name, options in DEFAULT_CANDIDATES if label(name, options) not in labels]
    if model in GATED_MODELS and not only_candidates:
        chosen += [("seer", options) for options in SEER_SETTINGS]
    if auto:
        if probes is None:
            chosen += [("auto", {"recall": target}) for target in TARGETS]
        else:
            chosen += [("auto", {"recall": target, "probe": probe}) for target in TARGETS for probe in probes]
    return chosen


def parse_prompt(text: str) -> dict:
    """``TASK:DEPTH:SEED`` (e.g. ``niah:0.5:0``) -> capture keyword arguments."""
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a prompt is TASK:DEPTH:SEED, got {text!r}")
    try:
        return {"task_name": parts[0], "depth": float(parts[1]), "seed": int(parts[2])}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"a prompt is TASK:DEPTH:SEED, got {text!r}: {error}") from None


# --- capture -------------------------------------------------------------------------------------


def capture(
    model_name: str,
    length: int,
    layers: Sequence[int] | None,
    cache: Path,
    *,
    task_name: str = "niah",
    depth: float = 0.5,
    seed: int = 0,
) -> dict:
    """Post-RoPE float32 q/k of ``layers`` (None: every non-window layer) on a ``task_name`` prompt
    (needle ``depth``, ``seed``; default the ``niah`` prompt at depth 0.5, seed 0).

    Returns ``{"layers": {layer: (q (1, Hq, S, D), k (1, Hkv, S, D))}, "scale": {layer: float},
    "needle_spans": ..., "prompt": ...}``, loaded from ``cache`` when an earlier run saved it.
    """
    from sparse_attn.eval.tasks import get_task
    from sparse_attn.integrations.records import WHOLE_BATCH

    tag = "all" if layers is None else "-".join(map(str, layers))
    path = cache / f"{model_name}-{length}-{task_name}-d{depth}-s{seed}-layers{tag}.pt"
    if path.is_file():
        print(f"captured q/k from {path}", flush=True)
        return torch.load(path, weights_only=True)
    model, tokenizer = sa.models.load(model_name, dtype=torch.float32)
    task = get_task(task_name)
    sample = task.make(tokenizer, length, depth, seed=seed)
    n_layers = model.config.num_hidden_layers
    # Every layer exact (causal SDPA); the recorder keeps the q/k of the non-window ones.
    sa.patch(model, method="dense", min_seq_len=1, dense_layers=range(n_layers))
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # The recorder warns that no layer ran a method: here every layer is dense on purpose.
            warnings.filterwarnings("ignore", message="sparse_attn.record: no layer ran the method")
            with torch.inference_mode(), sa.record(model, capture=True) as recorder:
                model(input_ids=torch.tensor([sample.input_ids]), logits_to_keep=1)
    finally:
        sa.unpatch(model)
    print(f"{model_name} forward at {length} tokens: {time.perf_counter() - start:.1f} s", flush=True)
    captured = sorted(layer for layer, row in recorder.tensors if row == WHOLE_BATCH)
    wanted = captured if layers is None else list(layers)
    missing = sorted(set(wanted) - set(captured))
    if missing:
        raise ValueError(f"layers {missing} of {model_name} recorded no q/k (window layers?); global: {captured}")
    result = {
        "layers": {},
        "scale": {},
        "needle_spans": [list(span) for span in sample.needle_spans],
        "prompt": {"task": task_name, "haystack": task.haystack, "depth": depth, "seed": seed, "length": length},
    }
    for layer in wanted:
        q, k, _ = recorder.tensors[(layer, WHOLE_BATCH)]
        result["layers"][layer] = (q.float().contiguous(), k.float().contiguous())
        attention = model.model.layers[layer].self_attn
        result["scale"][layer] = float(getattr(attention, "scaling", q.shape[-1] ** -0.5))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


# --- recall and density --------------------------------------------------------------------------


def _kept_blocks(pattern: BlockSparsePattern, rows: slice) -> torch.Tensor:
    """Bool ``(H, len(rows), n_kv_blocks)``: the KV blocks each query-block row of batch 0 keeps."""
    counts = pattern.kv_counts[0, :, rows]
    indices = pattern.kv_indices[0, :, rows].long()
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    kept = torch.zeros((*counts.shape, pattern.num_kv_blocks + 1), dtype=torch.bool, device=indices.device)
    kept.scatter_(-1, torch.where(used, indices, pattern.num_kv_blocks), True)
    return kept[..., :-1]


@torch.no_grad()
def head_recall(
    q: torch.Tensor, k: torch.Tensor, patterns: Sequence[BlockSparsePattern], *, scale: float, rows: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """True recall of causal ``patterns`` per query head, exact, without an S x S tensor.

    q ``(1, Hq, Sq, D)``, k ``(1, Hkv, Sk, D)`` (queries are the last ``Sq`` positions). A query's
    recall is the softmax mass (over all its causally visible keys) that falls in the keys its
    pattern row keeps; a head's recall is the mean over its ``Sq`` queries. Patterns may have any
    geometry (``block_k`` a multiple of a common granule; per query, KV or shared heads).

    Per chunk of ``rows`` queries (rounded up to a multiple of every ``block_q``) the scores
    against the visible keys are formed once (float32, ``Hq x rows x Sk``), softmaxed, and summed
    per granule of keys (the gcd of the ``block_k``); each pattern then reads the granules its
    rows keep. Memory ``O(Hq * rows * Sk)``.

    Returns float64 ``(len(patterns), Hq)`` head recall and ``(len(patterns), Hq, n_chunks)``
    per-chunk recall (mean over the chunk's queries).
    """
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if batch != 1 or k.shape[0] != 1:
        raise ValueError(f"head_recall takes batch 1, got q batch {batch} and k batch {k.shape[0]}")
    if q_heads % kv_heads or seq_k < seq_q:
        raise ValueError(f"need Hq % Hkv == 0 and Sk >= Sq, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if not patterns:
        raise ValueError("patterns must hold at least one pattern")
    for pattern in patterns:
        if (pattern.seq_q, pattern.seq_k, pattern.batch) != (seq_q, seq_k, 1):
            raise ValueError(
                f"a pattern of seq_q={pattern.seq_q}, seq_k={pattern.seq_k}, batch={pattern.batch} does not fit "
                f"q {tuple(q.shape)} / k {tuple(k.shape)}"
            )
    group, offset = q_heads // kv_heads, seq_k - seq_q
    granule = math.gcd(*(p.block_k for p in patterns))
    rows = math.lcm(rows, *(p.block_q for p in patterns))
    expanded = [p.expand_heads(q_heads) for p in patterns]
    n_chunks = -(-seq_q // rows)
    chunk_sums = torch.zeros((len(patterns), q_heads, n_chunks), dtype=torch.float64)
    keys_t = k[0].float().transpose(-1, -2)
    for chunk in range(n_chunks):
        start, end = chunk * rows, min((chunk + 1) * rows, seq_q)
        visible = offset + end
        n_granules = -(-visible // granule)
        queries = q[0, :, start:end].float().reshape(kv_heads, group * (end - start), dim)
        scores = (queries @ keys_t[:, :, :visible]).view(q_heads, end - start, visible) * scale
        positions = torch.arange(start, end, device=q.device) + offset
        scores.masked_fill_(torch.arange(visible, device=q.device) > positions[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        probs = torch.nn.functional.pad(probs, (0, n_granules * granule - visible))
        mass = probs.view(q_heads, end - start, n_granules, granule).sum(-1)
        del probs
        pooled: dict[int, torch.Tensor] = {}  # per block_q: the mass summed over each query block's rows
        for index, pattern in enumerate(expanded):
            block_q, block_k = pattern.block_q, pattern.block_k
            first = start // block_q
            row_block = torch.arange(start, end, device=q.device) // block_q - first
            if block_q not in pooled:
                n_rows = int(row_block[-1]) + 1
                pooled[block_q] = torch.zeros((q_heads, n_rows, n_granules)).index_add_(1, row_block, mass)
            block_mass = pooled[block_q]
            kept = _kept_blocks(pattern, slice(first, first + block_mass.shape[1]))
            granule_block = torch.arange(n_granules, device=q.device) * granule // block_k
            kept = kept[..., granule_block]
            chunk_sums[index, :, chunk] = (block_mass * kept).sum((1, 2)).double()
    counts = torch.tensor([min((c + 1) * rows, seq_q) - c * rows for c in range(n_chunks)], dtype=torch.float64)
    return chunk_sums.sum(-1) / seq_q, chunk_sums / counts


def head_density(pattern: BlockSparsePattern, q_heads: int) -> torch.Tensor:
    """Float64 ``(Hq,)``: per query head, computed blocks over causally valid blocks (batch 0)."""
    valid = int(causal_block_mask(pattern.seq_q, pattern.seq_k, pattern.block_q, pattern.block_k).sum())
    kept = pattern.expand_heads(q_heads).kv_counts[0].sum(-1, dtype=torch.int64)
    return kept.double() / valid


# --- one layer -----------------------------------------------------------------------------------


def evaluate_layer(q: torch.Tensor, k: torch.Tensor, chosen: Sequence[tuple[str, dict]], *, scale: float, gates=None):
    """Rows for one layer: per method-setting its per-head density and true recall, and for ``auto`` its choice.

    ``gates`` (a ``SeerGates`` layer's ``AttnGate``) is passed to ``seer`` settings; without it they
    are skipped. A setting that cannot run the case is recorded with its error.
    """
    q_heads = q.shape[1]
    entries, patterns = [], []
    # auto re-estimates its candidates on every call: on this layer's (deterministic) input it is given
    # the patterns already estimated here, so each candidate estimates once per layer (auto's
    # estimate_s then covers its probe and choice, and a chosen head-local candidate's estimate on
    # the GQA groups that chose it, not its candidates' estimates on all heads).
    shared: dict[str, BlockSparsePattern] = {}
    reuse = functools.partial(_shared_candidate, shared, q.shape[1], auto_module._candidate_pattern)
    for name, options in chosen:
        entry = {"method": name, "setting": label(name, options), "options": _jsonable(options)}
        call_options = dict(options)
        if name == "seer":
            if gates is None:
                continue
            call_options["gates"] = gates
        start = time.perf_counter()
        try:
            with torch.no_grad():
                if name == "auto":
                    config = sa.get_method("auto").make_config(**call_options)
                    with mock.patch.object(auto_module, "_candidate_pattern", reuse):
                        pattern, choice = choose(q, k, config, causal=True, block_q=BLOCK, block_k=BLOCK)
                    entry["chosen"] = choice.names(0)
                    entry["probe_recall"] = choice.recall[0].tolist()
                else:
                    pattern = sa.estimate(q, k, name, block_q=BLOCK, block_k=BLOCK, **call_options)
                    shared[entry["setting"]] = pattern
        except ValueError as error:
            entry["error"] = str(error)
            entries.append(entry)
            continue
        entry["estimate_s"] = time.perf_counter() - start
        entry["geometry"] = [pattern.block_q, pattern.block_k]
        entry["density"] = head_density(pattern, q_heads).tolist()
        entries.append(entry)
        patterns.append((entry, pattern))
    start = time.perf_counter()
    recall, per_chunk = head_recall(q, k, [pattern for _, pattern in patterns], scale=scale)
    for (entry, _), heads, chunks in zip(patterns, recall, per_chunk, strict=True):
        entry["recall"] = heads.tolist()
        entry["chunk_recall"] = [[round(value, 6) for value in head] for head in chunks.tolist()]
    return entries, time.perf_counter() - start


def _shared_candidate(
    shared: dict,
    layer_heads: int,
    estimate,
    name: str,
    options: dict,
    q,
    k,
    *,
    causal: bool,
    geometry: dict,
    capture=None,
):
    """``auto``'s candidate pattern: the pattern this layer already estimated when the call is for
    all ``layer_heads`` query heads, else ``estimate``'s (a chosen candidate run on some GQA groups
    only estimates again). With ``capture`` too: at this script's lengths (8K-32K) every
    estimator works in one chunk, where ``capture_rows`` gives the whole pattern as well."""
    found = shared.get(label(name, options))
    usable = found is not None and causal and q.shape[1] == layer_heads
    if usable and (found.block_q, found.block_k) == (geometry["block_q"], geometry["block_k"]):
        return found
    return estimate(name, options, q, k, causal=causal, geometry=geometry, capture=capture)


def _jsonable(options: dict) -> dict:
    return {key: value for key, value in options.items() if isinstance(value, (int, float, str, bool, type(None)))}


# --- summaries -----------------------------------------------------------------------------------


def _heads(rows: list[dict], setting: str) -> tuple[list[float], list[float]]:
    """All heads of all layers of one method-setting: (densities, recalls)."""
    density, recall = [], []
    for row in rows:
        if row["setting"] == setting and "recall" in row:
            density += row["density"]
            recall += row["recall"]
    return density, recall


def summarize(rows: list[dict]) -> list[dict]:
    """(a): per method-setting, mean density / recall over all heads and the share meeting each target."""
    order = list(dict.fromkeys(row["setting"] for row in rows if "recall" in row))
    summary = []
    for setting in order:
        density, recall = _heads(rows, setting)
        method = next(row["method"] for row in rows if row["setting"] == setting)
        entry = {
            "method": method,
            "setting": setting,
            "heads": len(recall),
            "density": sum(density) / len(density),
            "recall": sum(recall) / len(recall),
            "min_recall": min(recall),
        }
        for target in TARGETS:
            entry[f"share_{target}"] = sum(r >= target for r in recall) / len(recall)
        summary.append(entry)
    return summary


def oracle(rows: list[dict], candidates: Sequence[str], target: float) -> dict | None:
    """Per head, the cheapest of ``candidates`` whose TRUE recall meets ``target`` (dense if none)."""
    by_setting = {setting: _heads(rows, setting) for setting in candidates}
    by_setting = {setting: heads for setting, heads in by_setting.items() if heads[0]}
    if not by_setting:
        return None
    n_heads = len(next(iter(by_setting.values()))[0])
    densities = []
    for head in range(n_heads):
        met = [heads[0][head] for heads in by_setting.values() if heads[1][head] >= target]
        densities.append(min(met, default=1.0))
    return {"density": sum(densities) / n_heads, "heads": n_heads}


def cheapest(pool: list[dict]) -> dict | None:
    """The summary entry of lowest mean density, or None for an empty pool."""
    return min(pool, key=lambda entry: entry["density"]) if pool else None


def compare_auto(rows: list[dict], summary: list[dict], candidates: Sequence[str] | None = None) -> list[dict]:
    """(b): per target, the cheapest single setting meeting it on >= 95 % of heads against ``auto``.

    ``candidates``: the settings the per-head oracle chooses among (default: ``auto``'s default candidates).
    """
    if candidates is None:
        candidates = [label(name, options) for name, options in DEFAULT_CANDIDATES]
    result = []
    for target in TARGETS:
        keys = ("setting", "density", "recall", f"share_{target}")
        meeting = [s for s in summary if s["method"] != "auto" and s[f"share_{target}"] >= HEAD_SHARE]

        best = cheapest(meeting)
        autos = [s for s in summary if s["setting"] in _auto_settings(rows, target)]
        default = label("auto", {"recall": target})
        auto = next((s for s in autos if s["setting"] == default), autos[0] if autos else None)
        entry = {"target": target, "best_single": None, "auto": None, "oracle": oracle(rows, candidates, target)}
        if best is not None:
            entry["best_single"] = {key: best[key] for key in keys}
        # Also among the training-free settings (no seer) and among auto's own candidates.
        for name, pool in (
            ("best_training_free", [s for s in meeting if s["method"] != "seer"]),
            ("best_auto_candidate", [s for s in meeting if s["setting"] in candidates]),
        ):
            found = cheapest(pool)
            entry[name] = None if found is None else {key: found[key] for key in keys}
        if auto is not None:
            entry["auto"] = {key: auto[key] for key in ("setting", "density", "recall", f"share_{target}")}
            entry["auto_meets_budget"] = auto[f"share_{target}"] >= HEAD_SHARE
            if best is not None:
                entry["auto_cheaper"] = auto["density"] < best["density"]
            entry["auto_choices"], entry["probe_vs_true"] = _auto_detail(rows, auto["setting"])
            entry["auto_misses"] = auto_misses(rows, auto["setting"], target)
        # Every auto setting at this target (one per probe when several were run).
        entry["auto_settings"] = []
        for found in autos:
            verdict = {key: found[key] for key in ("setting", "density", "recall", f"share_{target}")}
            verdict["meets_budget"] = found[f"share_{target}"] >= HEAD_SHARE
            for name in ("best_single", "best_auto_candidate"):
                if entry[name] is not None:
                    verdict[f"cheaper_than_{name}"] = found["density"] < entry[name]["density"]
            verdict["choices"], verdict["probe_vs_true"] = _auto_detail(rows, found["setting"])
            verdict["misses"] = auto_misses(rows, found["setting"], target)
            entry["auto_settings"].append(verdict)
        if any("chunk_recall" in row for row in rows):
            entry["simulated_probes"] = simulate_selection(rows, candidates, target)
            # Diagnostic: the same replays without the candidate the last-query probe flatters most.
            reduced = [name for name in candidates if name != "proxyattn()"]
            entry["simulated_probes_without_proxyattn"] = simulate_selection(rows, reduced, target)
        result.append(entry)
    return result


def _auto_settings(rows: list[dict], target: float) -> list[str]:
    """The ``auto`` settings run at recall ``target`` (by their options; rows without options by label)."""
    found = []
    for row in rows:
        if row["method"] != "auto" or row["setting"] in found:
            continue
        options = row.get("options")
        if (
            (options.get("recall") == target)
            if options is not None
            else row["setting"] == label("auto", {"recall": target})
        ):
            found.append(row["setting"])
    return found


def _auto_detail(rows: list[dict], setting: str) -> tuple[dict, dict]:
    """How often ``auto`` chose each candidate, and its probe recall against the true recall of the choice."""
    chosen: dict[str, int] = {}
    probe, true = [], []
    for row in rows:
        if row["setting"] == setting and "recall" in row:
            for name in row["chosen"]:
                chosen[name] = chosen.get(name, 0) + 1
            probe += row["probe_recall"]
            true += row["recall"]
    over = [p - t for p, t in zip(probe, true, strict=True)]
    detail = {
        "mean_probe_recall": sum(probe) / len(probe),
        "mean_true_recall": sum(true) / len(true),
        "mean_probe_minus_true": sum(over) / len(over),
        "max_probe_minus_true": max(over),
    }
    return dict(sorted(chosen.items(), key=lambda item: -item[1])), detail


# One-sided 95 % normal quantile: the lower-bound probe rule below.
LOWER_BOUND_Z = 1.645


def probe_rules(n_chunks: int) -> dict[str, tuple[list[int], bool]]:
    """Probes replayed by :func:`simulate_selection`: the query chunks (of 128 queries) each looks at,
    and whether it tests a one-sided 95 % lower bound of the chunk mean instead of the mean."""
    spaced = {count: sorted({round(i * (n_chunks - 1) / (count - 1)) for i in range(count)}) for count in (8, 16)}
    return {
        "last chunk (auto's probe)": ([n_chunks - 1], False),
        "8 evenly spaced chunks": (spaced[8], False),
        "16 evenly spaced chunks": (spaced[16], False),
        "16 evenly spaced chunks, 95% lower bound": (spaced[16], True),
    }


def _probe_estimate(values: list[float], lower_bound: bool) -> float:
    mean = sum(values) / len(values)
    if not lower_bound or len(values) < 2:
        return mean
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean - LOWER_BOUND_Z * math.sqrt(variance / len(values))


def simulate_selection(rows: list[dict], candidates: Sequence[str], target: float) -> dict[str, dict]:
    """``auto``'s rule with other probes, replayed offline from the per-chunk true recall of its candidates.

    Per layer and head: the cheapest candidate whose probe estimate (the mean recall over the
    probe's query chunks, or its lower bound) reaches ``target`` (dense when none), judged by
    the chosen candidate's true recall over all queries. The probe chunks are a subset of the
    queries, as a real probe's would be; chunk recall is exact over a chunk's 128 queries (the
    real probe reads 64), so the last-chunk rule approximates ``auto`` and does not reproduce it.
    """
    layers = sorted({(row["model"], row["layer"]) for row in rows if "chunk_recall" in row})
    result = {}
    for layer in layers:
        mine = {row["setting"]: row for row in rows if (row["model"], row["layer"]) == layer and "chunk_recall" in row}
        mine = [mine[name] for name in candidates if name in mine]
        n_heads, n_chunks = len(mine[0]["recall"]), len(mine[0]["chunk_recall"][0])
        for rule, (chunks, lower_bound) in probe_rules(n_chunks).items():
            entry = result.setdefault(rule, {"density": [], "recall": [], "chunks": len(chunks)})
            for head in range(n_heads):
                best_density, best_recall = 1.0, 1.0
                for row in mine:
                    probe = _probe_estimate([row["chunk_recall"][head][c] for c in chunks], lower_bound)
                    if probe >= target and row["density"][head] < best_density:
                        best_density, best_recall = row["density"][head], row["recall"][head]
                entry["density"].append(best_density)
                entry["recall"].append(best_recall)
    return {
        rule: {
            "probe_queries": entry["chunks"] * BLOCK,
            "density": sum(entry["density"]) / len(entry["density"]),
            "recall": sum(entry["recall"]) / len(entry["recall"]),
            f"share_{target}": sum(r >= target for r in entry["recall"]) / len(entry["recall"]),
        }
        for rule, entry in result.items()
    }


def auto_misses(rows: list[dict], setting: str, target: float) -> dict[str, dict]:
    """Per candidate ``auto`` chose: heads chosen, heads whose true recall missed ``target``, and the
    mean / largest probe recall minus true recall (positive: the probe flattered the candidate)."""
    result: dict[str, dict] = {}
    for row in rows:
        if row["setting"] != setting or "recall" not in row:
            continue
        for name, probe, true in zip(row["chosen"], row["probe_recall"], row["recall"], strict=True):
            entry = result.setdefault(name, {"chosen": 0, "missed": 0, "gaps": []})
            entry["chosen"] += 1
            entry["missed"] += int(true < target)
            entry["gaps"].append(probe - true)
    for entry in result.values():
        gaps = entry.pop("gaps")
        entry["mean_probe_minus_true"] = sum(gaps) / len(gaps)
        entry["max_probe_minus_true"] = max(gaps)
    return dict(sorted(result.items(), key=lambda item: -item[1]["missed"]))


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear ``y`` at ``x`` through ``points`` (sorted by x); None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and x == points[0][0]:
        return points[0][1]
    return None


def compare_seer(summary: list[dict]) -> list[dict]:
    """(c): each ``seer`` setting against ``xattention`` interpolated at the same mean density."""
    xattention = [(s["density"], s["recall"]) for s in summary if s["method"] == "xattention"]
    xattention_share = [(s["density"], s["share_0.9"]) for s in summary if s["method"] == "xattention"]
    result = []
    for s in summary:
        if s["method"] != "seer":
            continue
        nearest = min(
            (x for x in summary if x["method"] == "xattention"), key=lambda x: abs(x["density"] - s["density"])
        )
        result.append(
            {
                "seer": s["setting"],
                "density": s["density"],
                "seer_recall": s["recall"],
                "xattention_recall_at_density": interpolate(xattention, s["density"]),
                "seer_share_0.9": s["share_0.9"],
                "xattention_share_0.9_at_density": interpolate(xattention_share, s["density"]),
                "nearest_xattention": nearest["setting"],
                "nearest_xattention_density": nearest["density"],
                "nearest_xattention_recall": nearest["recall"],
            }
        )
    return result


# --- output --------------------------------------------------------------------------------------

SUMMARY_COLUMNS = [
    ("setting", "method-setting", "s"),
    ("heads", "heads", "d"),
    ("density", "density", ".3f"),
    ("recall", "recall", ".4f"),
    ("min_recall", "min", ".3f"),
    ("share_0.9", ">=0.9", ".2f"),
    ("share_0.95", ">=0.95", ".2f"),
]


def plot(summaries: dict[str, list[dict]], path: Path) -> None:
    """Per model (columns): mean recall against mean density (top) and the share of heads reaching 0.95
    (bottom), per method-setting; one colour per method, ``auto`` as black stars. ``random`` is left
    out (far below the others; it is in the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {model: [s for s in summary if s["method"] != "random"] for model, summary in summaries.items()}
    methods = sorted({s["method"] for summary in shown.values() for s in summary if s["method"] != "auto"})
    cycle = [plt.get_cmap("tab10")(i) for i in range(10)]
    markers = "osD^v"
    style = {method: (cycle[i % 10], markers[i // 10 % len(markers)]) for i, method in enumerate(methods)}
    figure, axes = plt.subplots(2, len(shown), figsize=(7.5 * len(shown), 11), squeeze=False)
    panels = (("recall", "mean true recall (all queries)"), ("share_0.95", "share of heads with true recall >= 0.95"))
    for column, (model, summary) in enumerate(shown.items()):
        for row, (key, ylabel) in enumerate(panels):
            axis = axes[row][column]
            for method in methods:
                points = sorted((s["density"], s[key]) for s in summary if s["method"] == method)
                if points:
                    colour, marker = style[method]
                    axis.plot(*zip(*points, strict=True), marker=marker, color=colour, label=method, ms=5, lw=1)
            for s in summary:
                if s["method"] == "auto":
                    axis.plot(s["density"], s[key], "*", color="black", ms=18, zorder=5)
                    axis.annotate(s["setting"], (s["density"], s[key]), textcoords="offset points", xytext=(8, -12))
            for level in TARGETS if key == "recall" else (HEAD_SHARE,):
                axis.axhline(level, color="grey", lw=0.6, ls="--")
            axis.set_xscale("log")
            axis.set_xlabel("mean density (computed / causally valid blocks)")
            axis.set_ylabel(ylabel)
            axis.set_title(model)
            axis.set_ylim(max(0.0, min(s[key] for s in summary) - 0.02), 1.005 if key == "recall" else 1.02)
            axis.grid(alpha=0.3, which="both")
    handles = {}
    for axis in axes.flat:  # one legend for every method of every panel (seer is in SmolLM2's only)
        for handle, name in zip(*axis.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=8, loc="lower right", ncol=2)
    figure.suptitle("Recall vs density on the models' own q/k (* = auto; prompts in the JSON's meta)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run_model(
    model: str, length: int, layers, cache: Path, chosen, prompt: dict | None = None, key: str | None = None
) -> tuple[list[dict], dict]:
    """Rows and meta of one model on one prompt; the rows' ``model`` is ``key`` (default: ``model``)."""
    captured = capture(model, length, layers, cache, **(prompt or {}))
    key = model if key is None else key
    gate_set = None
    if any(name == "seer" for name, _ in chosen):
        from sparse_attn.methods.seer import shipped_gates

        gate_set = shipped_gates(model)
    rows, timings = [], {}
    for layer, (q, k) in captured["layers"].items():
        start = time.perf_counter()
        gates = gate_set[layer] if gate_set is not None else None
        entries, recall_s = evaluate_layer(q, k, chosen, scale=captured["scale"][layer], gates=gates)
        for entry in entries:
            rows.append({"model": key, "layer": layer, "seq": q.shape[2], **entry})
        timings[layer] = {"total_s": time.perf_counter() - start, "recall_s": recall_s}
        print(f"{key} layer {layer}: {timings[layer]['total_s']:.1f} s (recall {recall_s:.1f} s)", flush=True)
    meta = {
        "model": model,
        "seq": length,
        "layers": list(captured["layers"]),
        "q_heads": next(iter(captured["layers"].values()))[0].shape[1],
        "kv_heads": next(iter(captured["layers"].values()))[1].shape[1],
        "head_dim": next(iter(captured["layers"].values()))[0].shape[3],
        "prompt": captured["prompt"],
        "needle_spans": captured["needle_spans"],
        "timings": timings,
    }
    return rows, meta


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one SmolLM2 layer at 2K (no files unless --out)")
    parser.add_argument("--smollm2-length", type=int, default=8192)
    parser.add_argument("--gemma-length", type=int, default=16384)
    parser.add_argument("--smollm2-layers", type=int, nargs="+", default=list(SMOLLM2_LAYERS))
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    for model, flag in (("SmolLM2", "--smollm2-prompt"), ("Gemma 3", "--gemma-prompt")):
        parser.add_argument(
            flag,
            type=parse_prompt,
            nargs="+",
            default=[parse_prompt("niah:0.5:0")],
            help=f"{model}'s prompts as TASK:DEPTH:SEED (default niah:0.5:0, the prompt auto's spread probe was"
            " chosen on); with several, each is reported as its own case, named 'MODEL TASK:DEPTH:SEED'",
        )
    parser.add_argument(
        "--auto-probes",
        nargs="+",
        choices=list(auto_module.PROBES),
        default=None,
        help="run auto once per target and probe, with probe= set (default: auto at its default probe)",
    )
    parser.add_argument(
        "--only-candidates",
        action="store_true",
        help="dense and auto's default candidates only (no other settings, no seer): auto against its candidates",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where captured q/k are kept")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/cpu/recall_frontier.json)")
    parser.add_argument(
        "--from-results",
        type=Path,
        default=None,
        help="recompute the summaries, comparisons and PNG from this JSON (and its chunk-recall file) and rewrite them",
    )
    args = parser.parse_args(argv)
    if args.from_results is not None:
        return rewrite(args.from_results)
    torch.set_num_threads(args.threads)
    plan = {"smollm2-135m": (args.smollm2_length, args.smollm2_layers), "gemma3-270m": (args.gemma_length, None)}
    prompts = {"smollm2-135m": args.smollm2_prompt, "gemma3-270m": args.gemma_prompt}
    if args.quick:
        plan = {"smollm2-135m": (2048, [args.smollm2_layers[0]])}
        args.models = ["smollm2-135m"]
    started = time.perf_counter()
    rows, models_meta = [], {}
    for model in args.models:
        length, layers = plan[model]
        chosen = settings(model, probes=args.auto_probes, only_candidates=args.only_candidates)
        for prompt in prompts[model]:
            key = (
                model
                if len(prompts[model]) == 1
                else f"{model} {prompt['task_name']}:{prompt['depth']}:{prompt['seed']}"
            )
            mine, models_meta[key] = run_model(model, length, layers, args.cache, chosen, prompt, key)
            rows += mine
    meta = {
        "script": "benchmarks/recall_frontier.py",
        "quick": args.quick,
        "block": BLOCK,
        "targets": list(TARGETS),
        "head_share": HEAD_SHARE,
        "threads": args.threads,
        "wall_s": time.perf_counter() - started,
        "models": models_meta,
        "environment": environment(torch.device("cpu")),
        "recall": "true recall: softmax mass of every query inside its kept blocks, mean over queries (float32)",
        "density": "computed blocks / causally valid blocks in the pattern's own geometry",
        "auto_probes": args.auto_probes,
        "only_candidates": args.only_candidates,
        "caveats": [
            "one capture per (model, prompt): "
            + "; ".join(f"{model}: {model_meta['prompt']}" for model, model_meta in models_meta.items()),
            "seer gates were trained on pydoc text (SmolLM2's also kjv/essays): the haystack is in-distribution for them",
            "seer densities are over 64x64 blocks and moba's over token rows x its blocks, finer than 128x128",
            "pbs (a wrapper, no registered pattern) and the video/image methods (need a token grid) are not included",
            "the simulated probes replay auto's rule offline from per-chunk true recall (128-query chunks)",
        ],
    }
    summaries, comparisons = report(rows, models_meta)
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "recall_frontier.json")
    if out is not None:
        # The per-chunk recall (heads x chunks per row) is megabytes: kept beside the captures, not in the JSON.
        detail = args.cache / f"{out.stem}_chunk_recall.pt"
        args.cache.mkdir(parents=True, exist_ok=True)
        torch.save(
            [{key: row[key] for key in ("model", "layer", "setting", "chunk_recall") if key in row} for row in rows],
            detail,
        )
        meta["chunk_recall_file"] = str(detail)
        write(out, rows, meta, summaries, comparisons)
    return {"meta": meta, "summary": summaries, "comparisons": comparisons, "rows": rows}


def report(rows: list[dict], models_meta: dict) -> tuple[dict, dict]:
    """Per model: the summary table and comparisons, printed; returns both."""
    summaries, comparisons = {}, {}
    for model, model_meta in models_meta.items():
        mine = [row for row in rows if row["model"] == model]
        summaries[model] = summarize(mine)
        comparisons[model] = {"auto": compare_auto(mine, summaries[model]), "seer": compare_seer(summaries[model])}
        print(f"\n{model} at {model_meta['seq']} tokens, layers {model_meta['layers']}: all heads of all layers")
        print(format_table(summaries[model], SUMMARY_COLUMNS))
        _print_comparisons(comparisons[model])
    return summaries, comparisons


def auto_cases(comparisons: dict) -> dict[str, dict]:
    """Per ``auto`` probe (its options less ``recall``): of the (model, target) cases, how many met the
    budget on >= :data:`HEAD_SHARE` of heads and how many did so below the best single setting's density."""
    result: dict[str, dict] = {}
    for model, comparison in comparisons.items():
        for entry in comparison["auto"]:
            for verdict in entry.get("auto_settings", []):
                probe = verdict["setting"].replace(f"recall={entry['target']}", "").replace(", )", ")")
                probe = probe.replace("(, ", "(").replace("()", "(default probe)")
                case = result.setdefault(probe, {"cases": 0, "met": 0, "met_and_cheaper": 0, "detail": []})
                case["cases"] += 1
                case["met"] += int(verdict["meets_budget"])
                case["met_and_cheaper"] += int(
                    verdict["meets_budget"] and verdict.get("cheaper_than_best_single", False)
                )
                case["detail"].append(
                    {
                        "model": model,
                        "target": entry["target"],
                        "density": verdict["density"],
                        "share": verdict[f"share_{entry['target']}"],
                        "best_single_density": None
                        if entry["best_single"] is None
                        else entry["best_single"]["density"],
                    }
                )
    return result


def write(out: Path, rows: list[dict], meta: dict, summaries: dict, comparisons: dict) -> None:
    """The JSON (rows without their per-chunk recall) and the PNG beside it."""
    rows = [{key: value for key, value in row.items() if key != "chunk_recall"} for row in rows]
    cases = auto_cases(comparisons)
    for probe, case in cases.items():
        print(
            f"{probe}: met the budget on >= {HEAD_SHARE:.0%} of heads in {case['met']} of {case['cases']} cases,"
            f" {case['met_and_cheaper']} of them below the best single setting's density"
        )
    write_results(rows, out, {**meta, "summary": summaries, "comparisons": comparisons, "auto_cases": cases})
    plot(summaries, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def rewrite(path: Path) -> dict:
    """Recompute summaries and comparisons from a written JSON (the per-chunk recall from its
    ``chunk_recall_file`` when that still exists: else no replayed probes) and rewrite JSON and PNG."""
    import json

    saved = json.loads(path.read_text())
    meta = {key: value for key, value in saved["meta"].items() if key not in ("summary", "comparisons", "auto_cases")}
    rows = saved["rows"]
    detail = Path(meta.get("chunk_recall_file", ""))
    if detail.is_file():
        chunks = {
            (d["model"], d["layer"], d["setting"]): d["chunk_recall"] for d in torch.load(detail) if "chunk_recall" in d
        }
        for row in rows:
            key = (row["model"], row["layer"], row["setting"])
            if key in chunks:
                row["chunk_recall"] = chunks[key]
    summaries, comparisons = report(rows, meta["models"])
    write(path, rows, meta, summaries, comparisons)
    return {"meta": meta, "summary": summaries, "comparisons": comparisons, "rows": rows}


def _print_comparisons(comparisons: dict) -> None:
    for entry in comparisons["auto"]:
        best, auto = entry["best_single"], entry["auto"]
        target = entry["target"]
        best_text = "none" if best is None else f"{best['setting']} density {best['density']:.3f}"
        print(f"target {target}: best single meeting it on >= {HEAD_SHARE:.0%} of heads: {best_text}")
        for name in ("best_training_free", "best_auto_candidate"):
            found = entry.get(name)
            print(f"  {name}: " + ("none" if found is None else f"{found['setting']} density {found['density']:.3f}"))
        if auto is not None:
            print(
                f"  {auto['setting']}: density {auto['density']:.3f}, meets {target} on {auto[f'share_{target}']:.1%}"
                f" of heads; probe-true recall mean {entry['probe_vs_true']['mean_probe_minus_true']:+.4f};"
                + ("" if entry["oracle"] is None else f" per-head oracle: density {entry['oracle']['density']:.3f}")
            )
        for verdict in entry.get("auto_settings", []):
            print(
                f"  {verdict['setting']}: density {verdict['density']:.3f}, recall {verdict['recall']:.4f}, meets"
                f" {target} on {verdict[f'share_{target}']:.1%} of heads"
                f" ({'meets' if verdict['meets_budget'] else 'misses'} the budget on >= {HEAD_SHARE:.0%})"
            )
        for name, misses in entry.get("auto_misses", {}).items():
            if misses["missed"]:
                print(
                    f"  auto chose {name} on {misses['chosen']} heads, {misses['missed']} missed {target};"
                    f" probe - true recall mean {misses['mean_probe_minus_true']:+.3f},"
                    f" max {misses['max_probe_minus_true']:+.3f}"
                )
        for key, what in (("simulated_probes", ""), ("simulated_probes_without_proxyattn", " (without proxyattn)")):
            for rule, simulated in entry.get(key, {}).items():
                print(
                    f"  replayed selection{what}, probe = {rule}: density {simulated['density']:.3f}, recall"
                    f" {simulated['recall']:.4f}, meets {target} on {simulated[f'share_{target}']:.1%} of heads"
                )
    for entry in comparisons["seer"]:
        x_recall = entry["xattention_recall_at_density"]
        x_text = "out of xattention's range" if x_recall is None else f"{x_recall:.4f}"
        print(
            f"{entry['seer']}: density {entry['density']:.3f} recall {entry['seer_recall']:.4f};"
            f" xattention at that density {x_text}"
            f" (nearest {entry['nearest_xattention']}: {entry['nearest_xattention_density']:.3f},"
            f" {entry['nearest_xattention_recall']:.4f})"
        )


if __name__ == "__main__":
    main()
