"""diffusers integration: a sparse-attn method inside a diffusers image or video transformer.

``patch_diffusers(transformer, method="neighborhood", grid=(T, H, W), window=(3, 7, 7))`` wraps
the processor of every self- or joint-attention module of a diffusers model (Wan, Flux,
HunyuanVideo, CogVideoX, SD3, ...) in a :class:`SparseAttnProcessor` and returns a
:class:`DiffusersPatch` handle (``handle.unpatch()`` restores the original processors,
``handle.record()`` collects per-layer densities). ``unpatch_diffusers(transformer)`` does the
same as ``handle.unpatch()``.

How it hooks in, and why not through diffusers' attention dispatch. diffusers 0.42 routes most
processors through ``attention_dispatch.dispatch_attention_fn``, but its backends are a closed
``AttentionBackendName`` enum (a new backend cannot be registered without editing diffusers),
the active backend is process-global, and a backend function sees only q, k, v: not the
module (so no per-layer choice), not which tokens are text (joint attention), not the
denoising step. A processor sees all of that, but the processors are model-specific (RoPE
variants, QK norms, text concatenated before or after, fused projections), so rewriting one
per model would copy each model's code. :class:`SparseAttnProcessor` therefore *wraps* the
model's own processor: the processor runs unchanged (projections, norms, RoPE, concatenation,
output projection), and only its attention op is replaced. For the duration of the wrapped
call a ``torch.overrides.TorchFunctionMode`` routes
``torch.nn.functional.scaled_dot_product_attention`` to :func:`sparse_attn.sparse_attention`;
processors that use the dispatcher are pinned to its ``native`` backend for that call (the one
that calls SDPA), and the user's backend is left in place for everything else (dense warm-up
steps, unpatched layers). A processor that computes attention without SDPA (xformers, the
``baddbmm`` ``AttnProcessor``) is detected (no SDPA call seen) and warned about once: its layer
ran dense. Processors that are ``nn.Module``\\ s (IP-Adapter, trained processors: their
weights live in the module tree) are left unwrapped, with one warning.

Which calls run the method. For each SDPA call inside a wrapped processor (q ``(B, Hq, Sq, D)``,
k ``(B, Hk, Sk, D)``), with ``N`` the block's own tokens (``hidden_states``' length) and ``E``
the ``encoder_hidden_states`` length given to the processor (0 when none):

- **joint attention** (MM-DiT double-stream blocks: the processor concatenates the text into
  q/k/v): ``Sq == Sk == N + E``; the call's text tokens are the ``E`` encoder tokens;
- **self-attention**: no encoder tokens and ``Sq == Sk == N``; the call's text tokens are
  ``text_tokens`` (0 by default). Blocks that concatenate the text into ``hidden_states``
  themselves (Flux's single-stream blocks) have ``N`` = text + video: pass ``text_tokens=``;
- **cross-attention** (keys from ``encoder_hidden_states`` only, e.g. Wan's ``attn2``, or any
  call whose key length differs from the query length) **stays dense**: it runs the original
  SDPA call unchanged. Modules flagged ``is_cross_attention`` are not wrapped at all;
- calls with ``dropout_p > 0``, ``is_causal=True``, a context-parallel config, or an attention
  mask that is not a key-padding mask over text tokens also run the original SDPA (dense),
  with one warning per reason.

Key-padding masks (HunyuanVideo masks the padded text tokens): a boolean or additive
(``0``/``-inf``) mask broadcast over heads and queries (shape ``(B|1, 1, 1, Sk)``) that keeps
every grid token is computed exactly, row by row: the kept tokens run the method with the kept
text tokens as the layout's text, and the masked (padded) text queries attend densely to the
kept keys (``O(S * padded)``), which is what SDPA with that mask computes.

Layout. The method receives ``grid=`` (the token grid *after* patch embedding, e.g. Wan 2.1
480p 81 frames: latent ``(21, 60, 104)``, patch ``(1, 2, 2)`` -> ``grid=(21, 30, 52)``),
``text_tokens=`` (the call's text tokens, above) and ``text_position=``: where the processor
puts the text, which differs by model and cannot be read from the shapes: ``"before"`` for
Flux and CogVideoX, ``"after"`` for SD3 and HunyuanVideo (Wan's self-attention has no text).
It is required whenever a call has text tokens. A call whose length is not
``prod(grid) + text tokens`` raises ``ValueError`` naming ``grid``. Methods without a ``grid``
option (``dense``, ...) get no layout options. A method with a ``layer`` option (``vmoba``,
whose partition cycles over layers) gets the module's index among the patched modules unless
``layer`` is given.

Dense warm-up steps (``dense_steps=N``; video sparse attention papers keep the first denoising
steps dense, e.g. Sparse VideoGen and Radial Attention): a forward pre-hook on the transformer
reads its ``timestep`` argument (largest element, for per-token timesteps) and counts steps:
the first forward after patching is step 0; a smaller timestep than the previous forward's is
the next step; an equal one is the same step (classifier-free guidance run as two forwards); a
larger one starts a new generation at step 0. Steps ``0 .. N - 1`` run the original processors
untouched. Samplers that call the model at several timesteps per step (Heun, DPM-2) count each
call as a step. ``handle.step`` is the current step (``None`` before the first forward).

Gradients flow through the sparse attention (:func:`sparse_attn.sparse_attention` is
differentiable in q, k and v), so patched models can be fine-tuned. The interception is a
Python ``TorchFunctionMode`` around each wrapped processor call; ``torch.compile`` of a patched
model is untested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..api import DEFAULT_BLOCK, sparse_attention
from ..backends import BACKENDS
from ..checks import check_int
from ..layouts import TEXT_POSITIONS, Layout
from ..registry import get_method

__all__ = [
    "DiffusersLayerRecord",
    "DiffusersPatch",
    "DiffusersRecorder",
    "SparseAttnProcessor",
    "attention_layers",
    "patch_diffusers",
    "unpatch_diffusers",
]

PATCH_ATTRIBUTE = "_sparse_attn_diffusers"
# What the processor's SDPA call may pass, in SDPA's positional order.
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# The function itself, taken at import: the mode matches it even if the name is rebound later.
_SDPA = F.scaled_dot_product_attention


# Records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusersLayerRecord:
    """One attention call of a patched module.

    ``layer`` is the module's index in :func:`attention_layers` (as ``layers=`` takes it).
    ``kind`` is ``"sparse"`` (the method ran; ``head_density`` per pattern head: computed blocks
    over all blocks, summed over the batch) or ``"dense"`` (the original SDPA ran: ``reason``
    says why, ``head_density`` is ``(1.0,)``). ``step`` is the denoising step (``None`` when the
    forward passed no ``timestep``); ``text_tokens`` the call's text tokens.
    """

    layer: int
    name: str
    step: int | None
    kind: str
    method: str
    seq_q: int
    seq_k: int
    text_tokens: int
    head_density: tuple[float, ...]
    estimate_ms: float
    attention_ms: float
    reason: str = ""

    @property
    def density(self) -> float:
        return sum(self.head_density) / len(self.head_density)


@dataclass
class DiffusersRecorder:
    """What ``handle.record()`` collects: one :class:`DiffusersLayerRecord` per attention call
    of a patched module (dense warm-up steps, which run the original processors, are counted in
    ``dense_steps_seen`` instead)."""

    records: list[DiffusersLayerRecord] = field(default_factory=list)
    dense_steps_seen: Counter[int] = field(default_factory=Counter)

    def table(self) -> str:
        """Per call: layer, step, kind, method (or why dense), lengths, text tokens, density, timings."""
        header = (
            f"{'layer':>5} {'step':>4} {'kind':<6} {'method':<14} {'seq_q':>6} {'seq_k':>6} {'text':>5} "
            f"{'density':>7} {'est ms':>7} {'attn ms':>8}  module"
        )
        lines = [header, "-" * len(header)]
        for r in self.records:
            step = "-" if r.step is None else str(r.step)
            lines.append(
                f"{r.layer:>5} {step:>4} {r.kind:<6} {r.method:<14} {r.seq_q:>6} {r.seq_k:>6} {r.text_tokens:>5} "
                f"{r.density:>7.3f} {r.estimate_ms:>7.2f} {r.attention_ms:>8.2f}  {r.name}"
                + (f" ({r.reason})" if r.reason else "")
            )
        for step, count in sorted(self.dense_steps_seen.items()):
            lines.append(f"step {step}: {count} forward(s) ran dense (dense_steps)")
        return "\n".join(lines)


def _head_density(pattern) -> tuple[float, ...]:
    """Per pattern head: computed blocks over all blocks (non-causal), summed over the batch."""
    total = pattern.num_q_blocks * pattern.num_kv_blocks * pattern.batch
    kept = pattern.kv_counts.sum(dim=(0, 2), dtype=torch.int64)
    return tuple((kept.double() / total).tolist())


# Which modules -------------------------------------------------------------------------------
def _attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Self/joint attention modules by name, in module order: diffusers attention modules (they
    have ``set_processor`` and a ``processor``) not flagged ``is_cross_attention``."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "set_processor")
        and hasattr(module, "processor")
        and getattr(module, "is_cross_attention", False) is not True
    }


def attention_layers(model: torch.nn.Module) -> list[str]:
    """Names of the modules ``patch_diffusers`` can patch; ``layers=`` indexes this list."""
    _check_model(model)
    return list(_attention_modules(model))


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"transformer must be a diffusers model (a torch.nn.Module), got {type(model).__name__}")


def _select_layers(names: list[str], layers) -> list[str]:
    if layers is None:
        return names
    if isinstance(layers, (str, int)):
        raise TypeError(f"layers must be an iterable of indices or module names, got {layers!r}")
    chosen = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise TypeError(f"layers entries must be int indices or module names, got {layer!r}")
        if isinstance(layer, int):
            if not -len(names) <= layer < len(names):
                raise ValueError(
                    f"layers: index {layer} is out of range: the model has {len(names)} self/joint attention "
                    f"modules (sparse_attn.integrations.diffusers.attention_layers(transformer) lists them)"
                )
            chosen.append(names[layer])
        elif layer not in names:
            raise ValueError(f"layers: {layer!r} is not a self/joint attention module of the model")
        else:
            chosen.append(layer)
    return [name for name in names if name in set(chosen)]


# The handle -------------------------------------------------------------------------------------
class DiffusersPatch:
    """What ``patch_diffusers`` did to a model; ``unpatch()`` undoes it.

    Attributes: ``method``, ``options`` (the method's options, layout excluded), ``grid``,
    ``text_tokens``, ``text_position``, ``dense_steps``, ``backend``, ``block_q``, ``block_k``,
    ``layer_names`` (the wrapped modules, in order), ``step`` (current denoising step or
    ``None``), ``active`` (False after ``unpatch``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        options: dict,
        *,
        grid: tuple[int, ...] | None,
        text_tokens: int | None,
        text_position: str | None,
        dense_steps: int,
        backend: str,
        block_q: int,
        block_k: int,
    ) -> None:
        self.model = model
        self.method = method
        self.options = options
        self.grid = grid
        self.text_tokens = text_tokens
        self.text_position = text_position
        self.dense_steps = dense_steps
        self.backend = backend
        self.block_q = block_q
        self.block_k = block_k
        self.layer_names: list[str] = []
        self.step: int | None = None
        self.active = True
        self._last_timestep: float | None = None
        self._originals: dict[str, object] = {}
        self._hook = None
        self._recorders: list[DiffusersRecorder] = []
        self._warned: set[str] = set()
        spec = get_method(method)
        self._fields = {f.name for f in dataclasses.fields(spec.config_class)}

    def __repr__(self) -> str:
        state = "active" if self.active else "unpatched"
        return (
            f"DiffusersPatch({self.method!r}, {len(self.layer_names)} layers, grid={self.grid}, "
            f"dense_steps={self.dense_steps}, step={self.step}, {state})"
        )

    # Steps -----------------------------------------------------------------------------------
    @property
    def sparse_now(self) -> bool:
        """Whether the current forward runs the method (past the dense warm-up steps)."""
        return self.dense_steps == 0 or (self.step is not None and self.step >= self.dense_steps)

    def _before_forward(self, module, args, kwargs) -> None:
        """Forward pre-hook: advance ``step`` from the ``timestep`` argument (module docstring)."""
        timestep = kwargs.get("timestep")
        if timestep is None:
            try:
                timestep = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("timestep")
            except TypeError:
                timestep = None
        if timestep is None:
            if self.dense_steps:
                raise ValueError(
                    f"dense_steps={self.dense_steps} needs the denoising step, but {type(module).__name__}.forward "
                    "got no timestep argument"
                )
            self.step = None
        else:
            value = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
            last = self._last_timestep
            if self.step is None or last is None or value > last:
                self.step = 0
            elif value < last:
                self.step += 1
            self._last_timestep = value
        if not self.sparse_now:
            for recorder in self._recorders:
                recorder.dense_steps_seen[self.step] += 1

    # Warnings and records ---------------------------------------------------------------------
    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"sparse_attn.patch_diffusers: {message}", stacklevel=4)

    @contextlib.contextmanager
    def record(self) -> Iterator[DiffusersRecorder]:
        """``with handle.record() as rec:`` collects one :class:`DiffusersLayerRecord` per call.
        Timings synchronize the device around each sparse call."""
        recorder = DiffusersRecorder()
        self._recorders.append(recorder)
        try:
            yield recorder
        finally:
            self._recorders.remove(recorder)

    # Restore ------------------------------------------------------------------------------------
    def unpatch(self) -> torch.nn.Module:
        """Put the original processors back and remove the step hook. Returns the model."""
        if not self.active:
            return self.model
        modules = dict(self.model.named_modules())
        for name, processor in self._originals.items():
            modules[name].set_processor(processor)
        if self._hook is not None:
            self._hook.remove()
        if getattr(self.model, PATCH_ATTRIBUTE, None) is self:
            delattr(self.model, PATCH_ATTRIBUTE)
        self.active = False
        return self.model


# The processor --------------------------------------------------------------------------------
def _with_signature(call, signature: inspect.Signature):
    """``call`` as a plain function whose ``inspect.signature`` is ``signature``."""

    def forward(*args, **kwargs):
        return call(*args, **kwargs)

    forward.__signature__ = signature
    return forward


class SparseAttnProcessor:
    """Wraps a diffusers attention processor: runs it unchanged, with its SDPA call replaced by
    the patch's method (see the module docstring for which calls run it)."""

    def __init__(self, processor, *, layer: int, rank: int, name: str, patch: DiffusersPatch) -> None:
        self.processor = processor
        self.layer = layer  # index in attention_layers(model), as layers= takes it
        self.rank = rank  # position among the patched modules: a method's ``layer`` option
        self.name = name
        self.patch = patch
        self.signature = inspect.signature(processor.__call__)
        # diffusers' attention modules pass the processor only the keyword arguments its
        # ``__call__`` declares (the rest are dropped with a warning): declare the wrapped ones.
        self.__call__ = _with_signature(self._call, self.signature)

    def __repr__(self) -> str:
        return f"SparseAttnProcessor({self.processor!r}, layer={self.layer}, method={self.patch.method!r})"

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def _call(self, *args, **kwargs):
        patch = self.patch
        if not patch.sparse_now:
            return self.processor(*args, **kwargs)
        if getattr(self.processor, "_parallel_config", None) is not None:
            patch._warn_once(f"{self.name} uses context parallelism, which sparse_attn does not support: ran dense")
            return self.processor(*args, **kwargs)
        arguments = self.signature.bind(*args, **kwargs).arguments
        call = _AttentionCall(
            self, _tokens(arguments.get("hidden_states")), _tokens(arguments.get("encoder_hidden_states"))
        )
        with _native_dispatch(self.processor), _SparseSDPA(call):
            out = self.processor(*args, **kwargs)
        if not call.calls:
            patch._warn_once(
                f"{type(self.processor).__name__} ({self.name}) computed attention without "
                "torch.nn.functional.scaled_dot_product_attention: that layer ran dense"
            )
        return out


def _tokens(hidden_states) -> int:
    """Tokens of a processor's ``hidden_states``: ``(B, S, C)`` or an image ``(B, C, H, W)``; 0 for none."""
    if not isinstance(hidden_states, torch.Tensor):
        return 0
    if hidden_states.dim() == 4:
        return hidden_states.shape[2] * hidden_states.shape[3]
    return hidden_states.shape[1]


@contextlib.contextmanager
def _native_dispatch(processor) -> Iterator[None]:
    """Pin a dispatcher-based processor to diffusers' ``native`` backend (the one that calls SDPA)."""
    if not hasattr(processor, "_attention_backend"):
        yield
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    previous = processor._attention_backend
    processor._attention_backend = AttentionBackendName.NATIVE
    try:
        yield
    finally:
        processor._attention_backend = previous


class _SparseSDPA(TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` to one wrapped processor call's :class:`_AttentionCall`.
    (Inside ``__torch_function__`` the mode is off, so the torch calls made there run as usual.)"""

    def __init__(self, call: _AttentionCall) -> None:
        super().__init__()
        self.call = call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.call.attend(**dict(zip(_SDPA_PARAMETERS, args, strict=False)), **kwargs)
        return func(*args, **kwargs)


class _AttentionCall:
    """One wrapped processor call: its token counts, and each SDPA call made inside it."""

    def __init__(self, processor: SparseAttnProcessor, hidden_tokens: int, encoder_tokens: int) -> None:
        self.processor = processor
        self.patch = processor.patch
        self.hidden_tokens = hidden_tokens
        self.encoder_tokens = encoder_tokens
        self.calls = 0

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        self.calls += 1
        sdpa = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        seq_q, seq_k = query.shape[-2], key.shape[-2]
        joint = self.encoder_tokens > 0 and seq_q == seq_k == self.hidden_tokens + self.encoder_tokens
        own = self.encoder_tokens == 0 and seq_q == seq_k == self.hidden_tokens
        reason = None
        if not (joint or own) or query.dim() != 4:
            reason = "cross-attention"
        elif dropout_p > 0.0:
            reason = "dropout_p > 0"
        elif is_causal:
            reason = "is_causal=True"
        kept = None
        if reason is None and attn_mask is not None:
            kept = _key_padding(attn_mask, query.shape[0], seq_k)
            if kept is None:
                reason = "attention mask that is not a key-padding mask"
        if reason is not None:
            if reason != "cross-attention":
                self.patch._warn_once(f"{self.processor.name}: {reason}: ran dense SDPA")
            self._record_dense(seq_q, seq_k, reason)
            return _SDPA(query, key, value, **sdpa)
        text = self._text_tokens(seq_q, joint)
        if kept is None:
            return self._sparse(query, key, value, scale, text)
        return self._padded(query, key, value, scale, text, kept, sdpa)

    # Layout --------------------------------------------------------------------------------
    def _text_tokens(self, seq: int, joint: bool) -> int:
        patch = self.patch
        name = self.processor.name
        if joint:
            if patch.text_tokens is not None and patch.text_tokens != self.encoder_tokens:
                raise ValueError(
                    f"text_tokens={patch.text_tokens}, but {name} runs joint attention with "
                    f"{self.encoder_tokens} encoder tokens (leave text_tokens=None to take them from the call)"
                )
            text = self.encoder_tokens
        else:
            text = patch.text_tokens or 0
        if patch.grid is not None:
            grid_tokens = math.prod(patch.grid)
            if grid_tokens + text != seq:
                hint = ""
                if not joint and seq > grid_tokens:
                    hint = (
                        " (blocks that concatenate the text into hidden_states, like Flux's single-stream blocks, "
                        "need text_tokens=)"
                    )
                elif seq < grid_tokens:
                    hint = f" (if {name} does not attend over the grid, e.g. a text refiner, leave it out with layers=)"
                raise ValueError(
                    f"grid={patch.grid} has {grid_tokens} tokens, but {name}'s attention has {seq} tokens of which "
                    f"{text} are text: grid must be the token grid after patch embedding{hint}"
                )
        if text and patch.grid is not None and patch.text_position is None:
            raise ValueError(
                f"{name} attends jointly over {text} text tokens: pass text_position='before' or 'after' "
                "(where the model puts them: 'before' for Flux and CogVideoX, 'after' for SD3 and HunyuanVideo)"
            )
        return text

    def _method_options(self, text: int) -> dict:
        patch = self.patch
        options = dict(patch.options)
        if "grid" in patch._fields:
            options.update(grid=patch.grid, text_tokens=text)
            if patch.text_position is not None:
                options["text_position"] = patch.text_position
        if "layer" in patch._fields and "layer" not in options:
            options["layer"] = self.processor.rank
        return options

    # Attention ---------------------------------------------------------------------------
    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, text: int) -> torch.Tensor:
        patch = self.patch
        options = self._method_options(text)
        call = dict(
            method=patch.method,
            causal=False,
            scale=scale,
            backend=patch.backend,
            block_q=patch.block_q,
            block_k=patch.block_k,
            **options,
        )
        if not patch._recorders:
            return sparse_attention(q, k, v, **call)
        out, info = sparse_attention(q, k, v, return_info=True, **call)
        density = _head_density(info.pattern)
        self._record(
            "sparse", patch.method, q.shape[-2], k.shape[-2], text, density, info.estimate_ms, info.attention_ms
        )
        return out

    def _padded(self, q, k, v, scale, text: int, kept: torch.Tensor, sdpa: dict) -> torch.Tensor:
        """A key-padding mask over text tokens, row by row (module docstring); dense when it masks a grid token."""
        patch = self.patch
        seq = q.shape[-2]
        layout = (
            Layout(patch.grid, text_tokens=text, text_position=patch.text_position or "after") if patch.grid else None
        )
        grid_start = layout.grid_start if layout else 0
        grid_tokens = layout.grid_tokens if layout else 0
        rows_kept = [kept[row if kept.shape[0] > 1 else 0] for row in range(q.shape[0])]
        if not all(bool(row_kept[grid_start : grid_start + grid_tokens].all()) for row_kept in rows_kept):
            patch._warn_once(f"{self.processor.name}: attention mask hides grid tokens: ran dense SDPA")
            self._record_dense(seq, seq, "mask hides grid tokens")
            return _SDPA(q, k, v, **sdpa)
        out = torch.empty_like(q)
        for row, row_kept in enumerate(rows_kept):
            kept_index = row_kept.nonzero().squeeze(1)
            rows = slice(row, row + 1)
            q_row, k_row, v_row = (x[rows].index_select(2, kept_index) for x in (q, k, v))
            out[rows, :, kept_index] = self._sparse(q_row, k_row, v_row, scale, len(kept_index) - grid_tokens)
            padded_index = (~row_kept).nonzero().squeeze(1)
            if len(padded_index):
                out[rows, :, padded_index] = _SDPA(
                    q[rows].index_select(2, padded_index), k_row, v_row, scale=scale, enable_gqa=sdpa["enable_gqa"]
                )
        return out

    def _record_dense(self, seq_q: int, seq_k: int, reason: str) -> None:
        self._record("dense", "sdpa", seq_q, seq_k, 0, (1.0,), 0.0, 0.0, reason)

    def _record(self, *fields) -> None:
        """Append ``DiffusersLayerRecord(layer, name, step, *fields)`` to every active recorder."""
        entry = DiffusersLayerRecord(self.processor.layer, self.processor.name, self.patch.step, *fields)
        for recorder in self.patch._recorders:
            recorder.records.append(entry)


def _key_padding(mask: torch.Tensor, batch: int, seq_k: int) -> torch.Tensor | None:
    """Bool ``(B | 1, Sk)`` of the keys a key-padding mask keeps, or ``None`` when the mask is not
    one (not broadcast over heads and queries, or an additive mask with values other than 0/-inf)."""
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != seq_k:
        return None
    if mask.shape[0] not in (1, batch):
        return None
    rows = mask[:, 0, 0, :]
    if rows.dtype == torch.bool:
        return rows
    if not bool(((rows == 0) | (rows == float("-inf"))).all()):
        return None
    return rows == 0


# Entry points ------------------------------------------------------------------------------------
def patch_diffusers(
    transformer: torch.nn.Module,
    method: str = "neighborhood",
    *,
    grid: Iterable[int] | None = None,
    text_tokens: int | None = None,
    text_position: str | None = None,
    layers: Iterable[int | str] | None = None,
    dense_steps: int = 0,
    backend: str = "auto",
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    **options,
) -> DiffusersPatch:
    """Make a diffusers transformer's self/joint attention run ``method``. Returns the handle.

    Args:
        transformer: a diffusers model (``pipe.transformer``), patched in place.
        method: a registered method (``sparse_attn.list_methods()``), run with ``causal=False``;
            ``options`` are its hyperparameters (``window=``, ``dilation=``, ...).
        grid: the token grid after patch embedding, ``(T, H, W)`` or ``(H, W)``; required by the
            spatial methods (those with a ``grid`` option).
        text_tokens: text tokens in self-attention calls of blocks that concatenate the text
            into ``hidden_states`` themselves (Flux single-stream); ``None``: joint calls take
            their encoder length, self-attention calls have none. An int is checked in joint calls too.
        text_position: ``"before"`` or ``"after"`` the grid; required when a call has text tokens.
        layers: which modules run the method: indices into :func:`attention_layers` or module
            names; ``None`` for all. The others keep their processors.
        dense_steps: the first denoising steps run dense (counted from ``timestep``, module docstring).
        backend, block_q, block_k: as in :func:`sparse_attn.sparse_attention`.

    Cross-attention calls stay dense. Patching a patched model replaces its settings.
    """
    _check_model(transformer)
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_class)}
    check_int("dense_steps", dense_steps, minimum=0)
    check_int("block_q", block_q)
    check_int("block_k", block_k)
    check_int("text_tokens", text_tokens, minimum=0, allow_none=True)
    if text_position is not None and text_position not in TEXT_POSITIONS:
        raise ValueError(f"text_position must be one of {TEXT_POSITIONS} or None, got {text_position!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if grid is not None:
        grid = Layout(grid).grid  # checked: an int or a tuple or list of ints
    elif "grid" in fields:
        raise ValueError(f"method {method!r} needs the token grid: pass grid=(T, H, W) or (H, W)")
    # Unknown methods and options fail here, not mid-forward.
    layout_options = dict(grid=grid, text_tokens=text_tokens or 0) if "grid" in fields else {}
    if "grid" in fields and text_position is not None:
        layout_options["text_position"] = text_position
    spec.make_config(**options, **layout_options)
    previous = getattr(transformer, PATCH_ATTRIBUTE, None)
    if previous is not None:
        previous.unpatch()
    modules = _attention_modules(transformer)
    if not modules:
        raise ValueError(f"found no diffusers attention modules (with set_processor) in {type(transformer).__name__}")
    names = _select_layers(list(modules), layers)
    if "layer" in fields and "layer" not in options:  # each module's own layer option, checked now
        for rank in range(1, len(names)):
            spec.make_config(**options, **layout_options, layer=rank)
    handle = DiffusersPatch(
        transformer,
        method,
        dict(options),
        grid=grid,
        text_tokens=text_tokens,
        text_position=text_position,
        dense_steps=dense_steps,
        backend=backend,
        block_q=block_q,
        block_k=block_k,
    )
    skipped = []
    positions = {name: index for index, name in enumerate(modules)}
    for name in names:
        processor = modules[name].processor
        if isinstance(processor, torch.nn.Module):
            skipped.append(name)
            continue
        handle._originals[name] = processor
        wrapper = SparseAttnProcessor(
            processor, layer=positions[name], rank=len(handle.layer_names), name=name, patch=handle
        )
        modules[name].set_processor(wrapper)
        handle.layer_names.append(name)
    if skipped:
        warnings.warn(
            f"sparse_attn.patch_diffusers: {len(skipped)} module(s) have processors with weights (nn.Module: "
            f"IP-Adapter, trained processors) and stay dense: {skipped[:4]}{' ...' if len(skipped) > 4 else ''}",
            stacklevel=2,
        )
    handle._hook = transformer.register_forward_pre_hook(handle._before_forward, with_kwargs=True)
    setattr(transformer, PATCH_ATTRIBUTE, handle)
    return handle


def unpatch_diffusers(transformer: torch.nn.Module) -> torch.nn.Module:
    """Restore the processors ``patch_diffusers`` replaced. Returns the model."""
    _check_model(transformer)
    handle = getattr(transformer, PATCH_ATTRIBUTE, None)
    if handle is None:
        raise ValueError("transformer is not patched: call sparse_attn.patch_diffusers(transformer, ...) first")
    return handle.unpatch()
