"""Reproduce the study's finding on the default model: at equal bytes, does int4 beat SVD and TT?

For one FFN and one attention tensor of layer 15 and for the embedding of the embedded default model
(SmolLM2-135M) it measures int4 (group 128 where it divides the input dimension, else the largest
divisor below 128), then SVD with quantized factors at the largest rank whose bytes do not exceed
int4's, and for the embedding Tensor-Train cores at the largest ranks within the same bytes. For
each: relative error, weight cosine, output cosine on real calibration activations (Shakespeare
calibration split, 2048 tokens), the enclosing block's output cosine (attention / MLP) or, for the
tied embedding, the LM-head logits cosine, and the gates.

Prints ONE JSON object on stdout (progress on stderr).

    .venv/bin/python bench/study_compare.py [--layer 15] [--n-tokens 2048]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.whatif import sweeps  # noqa: E402
from sahc_core.whatif import measure as whatif  # noqa: E402
from sahc_core.io.corpus import default_corpus  # noqa: E402
from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.evaluate.model import load_model  # noqa: E402
from sahc_core.methods.lowrank import SVDConfig  # noqa: E402
from sahc_core.methods.registry import projected_bytes  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402
from sahc_core.methods.quant import QuantConfig  # noqa: E402
from sahc_core.methods.tt import TTConfig  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _group(n: int, cap: int = 128) -> int:
    return max(g for g in range(1, cap + 1) if n % g == 0)


def svd_at_bytes(shape: tuple[int, int], budget: int, bits: int | None) -> SVDConfig:
    """Largest-rank SVD config with ``bits`` factors whose bytes stay within ``budget``."""
    g = _group(math.gcd(*shape)) if bits is not None else None
    best = None
    for r in range(1, min(shape) + 1):
        cfg = SVDConfig(rank=r, bits=bits, group_size=g)
        if projected_bytes(shape, cfg) > budget:
            break
        best = cfg
    if best is None:
        raise ValueError(f"no SVD rank fits {budget} bytes for shape {shape}.")
    return best


def tt_at_bytes(shape: tuple[int, int], budget: int, bits: int | None) -> list[TTConfig]:
    """For r1 in the allowed powers of two, the largest r2 within ``budget`` (fp16 or int-k cores)."""
    out = []
    for r1 in sweeps.tt_rank_options(shape):
        if r1 < 64:
            continue
        best = None
        for r2 in range(1, 4097):
            cfg = TTConfig(ranks=(1, r1, r2, 1), bits=bits)
            try:
                if projected_bytes(shape, cfg) > budget:
                    break
            except ValueError:
                break
            best = cfg
        if best is not None:
            out.append(best)
    return out


def row(source, name: str, cfg, model, text: str, n_tokens: int) -> dict:
    t0 = time.perf_counter()
    m = whatif.measure_tensor(source, name, cfg, device="cpu")
    oc = whatif.output_cosine_for(source, name, cfg, model=model, calib_text=text, n_tokens=n_tokens, device="cpu")
    keep = ("method", "bytes", "ratio", "bits_per_weight", "rel_error", "weight_cosine", "eym_error",
            "quant_error", "rank", "predicted_error")
    out = {"tensor": name, "config": m["config"], **{k: m[k] for k in keep if k in m},
           **{k: oc[k] for k in ("output_cosine", "block_output_cosine", "lm_head_output_cosine", "n_tokens") if k in oc},
           "gates_failed": [g["gate"] for g in m["gates"] + oc["gates"] if not g["passed"]],
           "seconds": time.perf_counter() - t0}
    log(f"  {name} {m['config']}: ratio {m['ratio']:.2f}x err {m['rel_error']:.4f} wcos {m['weight_cosine']:.4f} "
        f"ocos {oc['output_cosine']:.4f} failed {out['gates_failed']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--n-tokens", type=int, default=2048)
    args = ap.parse_args()
    t0 = time.perf_counter()
    source = ModelSource.open(default_model_dir())
    model = load_model(source.path, device="cpu")
    text = default_corpus().calib_text
    L = args.layer
    tensors = [f"model.layers.{L}.mlp.down_proj.weight", f"model.layers.{L}.self_attn.q_proj.weight",
               "model.embed_tokens.weight"]
    rows, summary = [], []
    for name in tensors:
        shape = tuple(source.info(name).shape)
        int4 = QuantConfig(4, _group(shape[1]))
        budget = projected_bytes(shape, int4)
        cfgs = [int4, svd_at_bytes(shape, budget, 4), svd_at_bytes(shape, budget, 8)]
        if name == "model.embed_tokens.weight":
            cfgs += tt_at_bytes(shape, budget, None) + tt_at_bytes(shape, budget, 8)
        log(f"{name} {shape}: int4 budget {budget} bytes, {len(cfgs)} settings")
        these = [row(source, name, c, model, text, args.n_tokens) for c in cfgs]
        rows += these
        best = max(these, key=lambda r: r["output_cosine"])
        summary.append({"tensor": name, "shape": list(shape), "int4_bytes": budget,
                        "best_by_output_cosine": best["config"],
                        "int4_wins": best["method"] == "int",
                        "int4": {k: these[0][k] for k in ("rel_error", "weight_cosine", "output_cosine")},
                        "best_other": max((r for r in these[1:]), key=lambda r: r["output_cosine"])})
    print(json.dumps({"bench": "study_compare", "model": str(source.path), "layer": L, "n_tokens": args.n_tokens,
                      "calibration": "default_corpus().calib_text (Shakespeare calibration split)",
                      "load_avg": os.getloadavg(), "seconds": time.perf_counter() - t0,
                      "summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
