"""Run an evaluation grid on a transformers causal LM, appending one JSON line per finished case.

For each method variant the model is patched once (``sparse_attn.patch``) with
``min_seq_len`` at the shortest prompt, so every prefill runs the method; then each case
is one prefill under ``sparse_attn.record`` (density over the method's layers, timing)
followed by greedy decoding (decode steps run dense SDPA) or, for perplexity, the scored
logits of the prefill itself.

Timings are warm. Before the timed prefill of every case the runner makes the identical
call once, untimed by the row's ``prefill_s``: compilation (FlexAttention on CPU), Triton
autotuning and allocator growth happen there, whatever they depend on (shape, strides,
the pattern's block counts). Its duration is kept as ``first_prefill_s``. A row timed
without that warm-up says so (``prefill_warm`` false) and the report shows no speedup for it.

Results go to a JSONL file, one row per case, written as soon as the case finishes. A
rerun reads the file first and skips every case already there, so an interrupted run
resumes where it stopped; a partially written last line is dropped.
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..integrations import patch, record, unpatch
from ..integrations.cache import cache_keyword
from ..utils import synchronized_now
from .grid import Case
from .tasks import GENERATE, Sample, Task


def load_results(path: Path) -> list[dict]:
    """The rows of a results file (empty if it does not exist).

    Lines that are not complete JSON objects (a run killed mid-write) are dropped and the
    file is rewritten without them, so later appends start on a clean line.
    """
    if not path.exists():
        return []
    rows, broken = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            broken = True
            continue
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
        else:
            broken = True
    if broken or (rows and not path.read_bytes().endswith(b"\n")):
        staging = path.with_suffix(path.suffix + ".tmp")
        staging.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        os.replace(staging, path)
    return rows


def append_result(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as results:
        results.write(json.dumps(row) + "\n")


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def generation_prefill(model, input_ids: torch.Tensor):
    """The prefill of :func:`greedy_generate`: ``(output, cache)`` for ``input_ids`` (1, L).

    The cache is a fresh ``DynamicCache`` (per-layer sliding windows from the config),
    passed in and filled in place, so nothing reads the output's deprecated cache field.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    output = model(input_ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    return output, cache


def perplexity_logits(model, input_ids: torch.Tensor, scored_tokens: int) -> torch.Tensor:
    """The prefill of :func:`prefill_perplexity`: logits (1, scored_tokens + 1, vocab) of the last positions."""
    return model(input_ids, use_cache=False, logits_to_keep=scored_tokens + 1).logits


def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> tuple[list[int], float]:
    """Prefill ``input_ids`` (1, L), then greedy-decode with the KV cache.

    Returns ``(new token ids, prefill seconds)``; decoding stops at a token in ``stop_ids``.
    """
    device = input_ids.device
    start = synchronized_now(device)
    output, cache = generation_prefill(model, input_ids)
    prefill_seconds = synchronized_now(device) - start
    cache_argument = {cache_keyword(model): cache}
    tokens = []
    token = output.logits[:, -1:].argmax(-1)
    while True:
        tokens.append(int(token))
        if tokens[-1] in stop_ids or len(tokens) >= max_new_tokens:
            return tokens, prefill_seconds
        output = model(token, use_cache=True, logits_to_keep=1, **cache_argument)
        token = output.logits[:, -1:].argmax(-1)


def prefill_perplexity(model, input_ids: torch.Tensor, scored_tokens: int) -> tuple[float, float]:
    """Perplexity of the last ``scored_tokens`` of ``input_ids`` (1, L) given all before them.

    Only the logits that predict those tokens are computed (``logits_to_keep``), so memory
    stays small at long lengths. Returns ``(perplexity, prefill seconds)``.
    """
    device = input_ids.device
    start = synchronized_now(device)
    logits = perplexity_logits(model, input_ids, scored_tokens)
    prefill_seconds = synchronized_now(device) - start
    predictions = logits[0, :-1].float()
    targets = input_ids[0, -scored_tokens:]
    loss = torch.nn.functional.cross_entropy(predictions, targets)
    return math.exp(float(loss)), prefill_seconds


class Runner:
    """Runs cases of a grid on one model, writing each finished case to ``results_path``.

    Args:
        model, tokenizer: a transformers causal LM (eval mode, on its device) and its tokenizer.
        model_name: the name results are filed under (part of each case's key).
        tasks: the :class:`Task` objects by name (they fix the haystack source).
        results_path: the JSONL file to append to and resume from.
        backend: the block-sparse backend for patched layers (``"auto"``, ``"flex"``, ...).
        warmup: before each case's timed prefill, make the identical call once (see the module
            docstring). Without it the rows' timings include first-call costs and are marked
            ``prefill_warm: false``, so the report shows no speedup for them.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_name: str,
        tasks: dict[str, Task],
        results_path: Path,
        backend: str = "auto",
        warmup: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.tasks = tasks
        self.results_path = Path(results_path)
        self.backend = backend
        self.device = next(model.parameters()).device
        self.warmup = warmup
        self.stop_ids = _eos_ids(model, tokenizer)
        self._samples: dict[tuple, Sample] = {}

    def key(self, case: Case) -> str:
        return case.key(self.model_name, self.tasks[case.task].haystack)

    def pending(self, cases: list[Case]) -> list[Case]:
        """The cases without a result in the results file."""
        done = {row["key"] for row in load_results(self.results_path)}
        return [case for case in cases if self.key(case) not in done]

    def sample(self, case: Case) -> Sample:
        index = (case.task, case.length, case.depth, case.seed)
        if index not in self._samples:
            self._samples[index] = self.tasks[case.task].make(self.tokenizer, case.length, case.depth, case.seed)
        return self._samples[index]

    def prepare(self, cases: list[Case]) -> None:
        """Build the prompts of the unfinished ``cases`` (tokenization only, no model call).

        Raises ``ValueError`` when a prompt cannot hold its task, before any case runs.
        """
        for case in self.pending(cases):
            self.sample(case)

    def run(self, cases: list[Case], progress=None) -> list[dict]:
        """Run the cases not finished yet; returns the rows of all ``cases`` (old and new).

        ``progress`` is an optional ``rich.progress.Progress`` to report on.
        """
        self.results_path.parent.mkdir(parents=True, exist_ok=True)
        self.prepare(cases)
        todo = self.pending(cases)
        bar = progress.add_task("eval", total=len(cases), completed=len(cases) - len(todo)) if progress else None
        min_seq_len = min(case.length for case in cases) if cases else 1
        variants = list(dict.fromkeys(case.variant for case in todo))
        with torch.inference_mode():
            for variant in variants:
                patch(self.model, min_seq_len=min_seq_len, backend=self.backend, **self._patch_options(variant))
                try:
                    for case in (case for case in todo if case.variant == variant):
                        if progress:
                            progress.update(bar, description=f"{variant.label} {case.task} {case.length}")
                        append_result(self.results_path, self.run_case(case))
                        if progress:
                            progress.advance(bar)
                finally:
                    unpatch(self.model)
        keys = {self.key(case) for case in cases}
        return [row for row in load_results(self.results_path) if row["key"] in keys]

    def _patch_options(self, variant) -> dict:
        """``patch`` arguments for a variant: its method and options, except ``seer``, whose gates
        are per layer (``layer_methods`` from the model's shipped gates; ``ValueError`` without)."""
        if variant.name != "seer":
            return {"method": variant.name, **dict(variant.options)}
        from ..methods.seer import seer_layer_methods

        return {"method": "dense", "layer_methods": seer_layer_methods(self.model, **dict(variant.options))}

    def _ids(self, case: Case) -> torch.Tensor:
        return torch.tensor([self.sample(case).input_ids], device=self.device)

    def _warm_up(self, task: Task, sample: Sample, input_ids: torch.Tensor) -> float:
        """Make the prefill call the case will time, untimed by it; returns its seconds."""
        start = synchronized_now(self.device)
        if task.kind == GENERATE:
            generation_prefill(self.model, input_ids)
        else:
            perplexity_logits(self.model, input_ids, sample.scored_tokens)
        return synchronized_now(self.device) - start

    def run_case(self, case: Case) -> dict:
        """Run one case on the (already patched) model; returns its result row."""
        task, sample = self.tasks[case.task], self.sample(case)
        input_ids = self._ids(case)
        # Outside ``record``: the warm-up's layer entries must not count in the row.
        first_prefill_seconds = self._warm_up(task, sample, input_ids) if self.warmup else None
        with record(self.model) as recorder:
            if task.kind == GENERATE:
                tokens, prefill_seconds = greedy_generate(self.model, input_ids, sample.max_new_tokens, self.stop_ids)
                output = self.tokenizer.decode(tokens, skip_special_tokens=True)
                score = task.score(sample, output)
            else:
                score, prefill_seconds = prefill_perplexity(self.model, input_ids, sample.scored_tokens)
                output = ""
        method_layers = [entry for entry in recorder.records if entry.kind == "sparse"]
        density = sum(entry.density for entry in method_layers) / len(method_layers) if method_layers else None
        return {
            "key": self.key(case),
            "model": self.model_name,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "backend": self.backend,
            "task": case.task,
            "haystack": task.haystack,
            "method": case.variant.name,
            "options": dict(case.variant.options),
            "label": case.variant.label,
            "length": case.length,
            "depth": case.depth,
            "needle_depth": sample.needle_depths[0] if sample.needle_depths else None,
            "seed": case.seed,
            "score": score,
            "higher_is_better": task.higher_is_better,
            "density": density,
            "method_layers": len(method_layers),
            "estimate_ms": sum(entry.estimate_ms for entry in method_layers),
            "prefill_s": prefill_seconds,
            "prefill_warm": first_prefill_seconds is not None,
            "first_prefill_s": first_prefill_seconds,
            "output": output,
            "answers": list(sample.answers),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
