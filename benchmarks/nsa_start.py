"""Where NSA starts in a pretrained model: validation loss of SmolLM2-135M with NSA swapped into
every layer, before any training, for each of ``swap_in_nsa``'s starts, against the dense model.

``dense`` is the model as trained (transformers' SDPA). ``nsa`` is
:func:`sparse_attn.nn.nsa_models.swap_in_nsa` with its default ``start="dense"`` (compressors as
mean pooling plus a zero-initialised MLP residual, gate biases (-4, 4, -4)); ``nsa-paper`` with
``start="paper"`` (the paper's MLP compressor under ``torch.manual_seed(--seed + 1)``, every gate
at 1/2). The loss is the mean over the last ``--held-out`` sequences of ``--seq`` tokens of the
haystack texts (the held-out split of ``benchmarks/train_smollm2.py``, whose model loading,
tokenisation and loss this script reuses). CPU in float32, or CUDA under bfloat16 autocast.
Writes ``benchmarks/results/<device>/nsa_start.json``.

    python benchmarks/nsa_start.py --device cpu --seq 4096 --held-out 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparse_attn as sa  # noqa: E402
from sparse_attn.bench import device_slug, environment, format_table, write_results  # noqa: E402
from train_smollm2 import DENSE, MODEL, NSA_LABELS, load_model, switch, token_sequences, validation_loss  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--held-out", type=int, default=2, help="last sequences of the texts to score")
    parser.add_argument("--texts", nargs="+", default=["kjv", "essays", "pydoc"], help="haystack sources")
    parser.add_argument("--modes", nargs="+", default=[DENSE, *NSA_LABELS], choices=[DENSE, *NSA_LABELS])
    parser.add_argument("--layers", type=int, help="keep the first N layers only (CPU smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    _, tokenizer = sa.models.load(MODEL, dtype=torch.float32, device="cpu")
    held_out = token_sequences(tokenizer, args.seq, args.texts)[-args.held_out :]
    rows = []
    for mode in args.modes:
        torch.manual_seed(args.seed)
        model = load_model(device, args.layers)
        torch.manual_seed(args.seed + 1)  # NSA's new parameters, as in train_smollm2.py
        switch(model, mode, min_seq_len=0)
        start = time.perf_counter()
        loss = validation_loss(model, held_out, device)
        rows.append({"mode": mode, "validation_loss": loss, "seconds": time.perf_counter() - start})
        print(f"{mode}: validation loss {loss:.4f}", flush=True)
        del model
    dense = next((row["validation_loss"] for row in rows if row["mode"] == DENSE), None)
    for row in rows:
        row["vs_dense"] = None if dense is None else row["validation_loss"] / dense
    columns = [("mode", "mode", "s"), ("validation_loss", "validation loss", ".4f"), ("vs_dense", "/ dense", ".3f")]
    print(format_table(rows, columns))
    path = args.output or Path(__file__).parent / "results" / device_slug(device) / "nsa_start.json"
    meta = {"benchmark": "nsa_start", "model": MODEL, "seq": args.seq, "held_out": args.held_out,
            "texts": args.texts, "layers": args.layers, **environment(device)}  # fmt: skip
    write_results(rows, path, meta)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
