"""Synthetic plan-optimizer candidate tables with a realistic byte and damage structure (seeded).

Used by ``tests/test_solver.py`` and ``bench/solver.py``. Shapes follow a real model: SmolLM2-135M
(the embedded default: 30 layers x 7 linears + the tied embedding = 211 tensors) or a Qwen3.5-9B-like
hybrid (32 layers of attention/linear-attention/FFN linears + a vision tower + embedding and LM head,
800 tensors). Per tensor there are 40 options: keep, int (bits 2..8 x group 32/64/128), gptq
(bits 2/3/4/8 x group 64/128), svd (5 rank fractions x 8/16-bit factors), and for the embedding tt.

Bytes use the exact formulas' structure (codes + fp16 scale and zero per group; SVD factors
r(m+n); TT cores). Damage is ``sensitivity x relative MSE`` with the quantisation MSE falling like
``4^-bits`` (bigger groups slightly worse, GPTQ ~40 % lower), the SVD MSE the tail energy of a
power-law spectrum, each times log-normal noise: decreasing and convex-ish in bytes, not exactly.
Options whose relative error exceeds the gate fail ``feasible``.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

_SMOL = dict(layers=30, hidden=576, inter=1536, kv=192, vocab=49152)
_QWEN = dict(layers=32, hidden=4096, inter=12288, kv=1024, vocab=248320)


def _shapes(size: str) -> list[tuple[str, str, tuple[int, int]]]:
    """(name, component, shape) of every 2-D tensor of the named model size."""
    if size == "smol":
        c = _SMOL
        out = [("model.embed_tokens.weight", "embedding", (c["vocab"], c["hidden"]))]
        for i in range(c["layers"]):
            h, f, kv = c["hidden"], c["inter"], c["kv"]
            for n, comp, s in (("q_proj", "attention_full", (h, h)), ("k_proj", "attention_full", (kv, h)),
                               ("v_proj", "attention_full", (kv, h)), ("o_proj", "attention_full", (h, h)),
                               ("gate_proj", "ffn", (f, h)), ("up_proj", "ffn", (f, h)), ("down_proj", "ffn", (h, f))):
                out.append((f"model.layers.{i}.{n}.weight", comp, s))
        return out
    c = _QWEN
    h, f, kv = c["hidden"], c["inter"], c["kv"]
    out = [("model.embed_tokens.weight", "embedding", (c["vocab"], h)),
           ("lm_head.weight", "embedding", (c["vocab"], h))]
    for i in range(c["layers"]):
        if i % 4 == 3:
            attn = [("q_proj", (2 * h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))]
            comp = "attention_full"
        else:
            attn = [("in_proj_qkv", (3 * h, h)), ("in_proj_z", (h, h)), ("in_proj_ba", (64, h)), ("out_proj", (h, h))]
            comp = "attention_linear"
        for n, s in attn:
            out.append((f"model.layers.{i}.attn.{n}.weight", comp, s))
        for n, s in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
            out.append((f"model.layers.{i}.mlp.{n}.weight", "ffn", s))
    v = 1152
    i = 0
    while len(out) < 800:
        for n, s in (("qkv", (3 * v, v)), ("proj", (v, v)), ("fc1", (4304, v)), ("fc2", (v, 4304))):
            if len(out) < 800:
                out.append((f"model.visual.blocks.{i}.{n}.weight", "vision", s))
        i += 1
    return out


def synthetic_candidates(size: str = "smol", n_tensors: int | None = None, seed: int = 0,
                         gate: float = 0.35) -> tuple[pd.DataFrame, int]:
    """``(candidates, original_bytes)``: 40 options per tensor of ``size`` ("smol" 211, "qwen" 800 tensors).

    ``n_tensors`` keeps only the first tensors (smaller instances of the same structure).
    """
    rng = np.random.default_rng(seed)
    shapes = _shapes(size)[:n_tensors]
    rows = []
    for name, comp, (m, n) in shapes:
        numel = m * n
        sens = float(rng.lognormal(0.0, 1.0)) * (3.0 if comp == "embedding" else 1.0) / len(shapes)
        alpha = float(rng.uniform(0.3, 1.2))  # spectral decay exponent: sigma_i ~ i^-alpha

        def add(method: str, cfg: dict, bits: float, group: float, nbytes: int, rel_mse: float) -> None:
            mse = rel_mse * float(rng.lognormal(0.0, 0.15))
            rows.append(dict(tensor=name, component=comp, method=method, config=json.dumps(cfg), bits=bits,
                             group_size=group, bytes=int(nbytes), damage=sens * mse,
                             feasible=bool(np.sqrt(mse) < gate)))

        add("keep", {"method": "keep"}, np.nan, np.nan, 2 * numel, 0.0)
        for bits in (2, 3, 4, 5, 6, 8):
            for g in (32, 64, 128):
                add("int", {"method": "int", "bits": bits, "group_size": g}, bits, g,
                    numel * bits // 8 + (numel // g) * 4, 0.35 * 4.0 ** (-bits) * (1 + 0.15 * np.log2(g / 32)))
        for bits in (2, 3, 4, 8):
            for g in (64, 128):
                add("gptq", {"method": "gptq", "bits": bits, "group_size": g}, bits, g,
                    numel * bits // 8 + (numel // g) * 4, 0.21 * 4.0 ** (-bits) * (1 + 0.15 * np.log2(g / 32)))
        k = min(m, n)
        energy = np.cumsum(np.arange(1, k + 1, dtype=float) ** (-2 * alpha))
        for frac in (0.1, 0.2, 0.3, 0.4, 0.5):
            r = max(1, int(frac * k))
            tail = 1.0 - energy[r - 1] / energy[-1]
            for bits, g in ((8, 128.0), (16, np.nan)):
                fac = r * (m + n)
                nbytes = fac * 2 if bits == 16 else fac + (fac // 128) * 4
                add("svd", {"method": "svd", "rank": r, "bits": bits}, np.nan if bits == 16 else bits, g, nbytes,
                    tail + (0.35 * 4.0 ** -8 if bits == 8 else 0.0))
        n_tt = 40 - 1 - 18 - 8 - 10
        for j in range(n_tt):
            if comp == "embedding":
                rank = 32 * (j + 1)
                add("tt", {"method": "tt", "tt_ranks": [1, rank, rank, 1]}, np.nan, np.nan,
                    2 * rank * rank * 64 + 2 * rank * (m + n), 0.6 / (1 + rank / 32))
            else:  # a second keep dtype: same bytes and damage as keep (a duplicate the reduction drops)
                add("keep", {"method": "keep", "dtype": "float16"}, np.nan, np.nan, 2 * numel, 0.0)
    return pd.DataFrame(rows), 2 * sum(m * n for _, _, (m, n) in shapes)
