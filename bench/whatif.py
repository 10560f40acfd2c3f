"""What-if speed bench: slider moves after the first SVD, and the TT sweep of the default embedding.

A "move" is one ``whatif.measure_tensor`` call with a new SVD rank or factor bit width (no DuckDB
cache, so every move really compresses and measures): it returns ratio + measured error. The SVD of
the tensor runs once before the moves and is timed separately. Targets: p95 < 0.3 s for the default
model's largest tensors (embedding 49152×576, FFN 1536×576), < 2 s for a random 12288×4096 matrix on
CPU; the TT sweep of the 49152×576 embedding (the study's six rank tuples) under a minute on CPU.
Also times int-k moves (new bits), which need no SVD; they count toward the same targets.

Prints ONE JSON object on stdout (progress on stderr).

    .venv/bin/python bench/whatif.py            # everything (several minutes on 2 busy cores)
    .venv/bin/python bench/whatif.py --quick    # default model only, no 12288×4096, no TT sweep
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.whatif import sweeps  # noqa: E402
from sahc_core.whatif import measure as whatif  # noqa: E402
from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.device import resolve_device  # noqa: E402
from sahc_core.methods.lowrank import SVDConfig  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402
from sahc_core.methods.quant import QuantConfig  # noqa: E402

EMB = "model.embed_tokens.weight"
FFN = "model.layers.15.mlp.gate_proj.weight"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _stats(times: list[float]) -> dict:
    a = np.asarray(times)
    return {"n": len(a), "p50_s": float(np.percentile(a, 50)), "p95_s": float(np.percentile(a, 95)),
            "max_s": float(a.max()), "mean_s": float(a.mean())}


def svd_moves(source: ModelSource, name: str, n_moves: int, device: str, seed: int = 0) -> dict:
    """First SVD, then ``n_moves`` alternating rank / factor-bit moves (seeded, all distinct)."""
    whatif.clear_caches()
    shape = source.info(name).shape
    k = min(shape)
    t0 = time.perf_counter()
    whatif.svd_of(source, name, device=device)
    first_svd = time.perf_counter() - t0
    rng = random.Random(seed)
    g = next((x for x in (128, 64, 32) if shape[0] % x == 0 and shape[1] % x == 0), None)
    rank, bits = max(1, k // 4), 4
    # The first move also builds the per-tensor rotation W·Vᵀ (once per tensor, like the SVD).
    t0 = time.perf_counter()
    whatif.measure_tensor(source, name, SVDConfig(rank=rank, bits=bits, group_size=g), device=device)
    first_move = time.perf_counter() - t0
    times, seen = [], {(rank, bits)}
    while len(times) < n_moves:
        if len(times) % 2 == 0:
            rank = rng.choice([max(1, round(f * k)) for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0)])
        else:
            bits = rng.choice([2, 3, 4, 6, 8, None])
        if (rank, bits) in seen:
            continue
        seen.add((rank, bits))
        t0 = time.perf_counter()
        m = whatif.measure_tensor(source, name, SVDConfig(rank=rank, bits=bits, group_size=g), device=device)
        times.append(time.perf_counter() - t0)
        assert m["ratio"] > 0 and 0 <= m["rel_error"]
    log(f"  {name} {tuple(shape)}: first SVD {first_svd:.2f} s, moves {_stats(times)}")
    return {"tensor": name, "shape": list(shape), "first_svd_s": first_svd, "first_move_s": first_move,
            "moves": _stats(times)}


def int_moves(source: ModelSource, name: str) -> dict:
    """int-k moves: every bits 2..8 at the largest group size <= 128 that divides the rows."""
    n = source.info(name).shape[-1]
    g = max(x for x in range(16, 129, 16) if n % x == 0)
    times = []
    for bits in range(2, 9):
        t0 = time.perf_counter()
        whatif.measure_tensor(source, name, QuantConfig(bits, g))
        times.append(time.perf_counter() - t0)
    return {"tensor": name, "group_size": g, "moves": _stats(times)}


def random_source(tmp: Path, m: int = 12288, n: int = 4096) -> ModelSource:
    """A one-tensor model directory holding a seeded random m×n float32 matrix."""
    gen = torch.Generator().manual_seed(0)
    (tmp / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.randn(m, n, generator=gen) * 0.02},
              str(tmp / "model.safetensors"))
    return ModelSource.open(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--moves", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu (the targets are CPU targets) or auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    out: dict = {"bench": "whatif", "device": device, "torch_threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "platform": platform.platform(),
                 "note": "a load_avg_start above cpu_count means other jobs shared the CPU (seconds inflated)"}
    source = ModelSource.open(default_model_dir())
    out["model"] = str(source.path)
    log("svd moves, default model")
    out["svd_moves"] = [svd_moves(source, name, args.moves, device) for name in (EMB, FFN)]
    log("int moves, default model")
    out["int_moves"] = [int_moves(source, name) for name in (EMB, FFN)]
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            log("svd moves, random 12288x4096")
            rnd = random_source(Path(tmp))
            out["svd_moves"].append(svd_moves(rnd, "model.layers.0.mlp.up_proj.weight", args.moves, device))
            out["int_moves"].append(int_moves(rnd, "model.layers.0.mlp.up_proj.weight"))
        whatif.clear_caches()
        log("TT sweep of the embedding (the study's rank tuples)")
        t0 = time.perf_counter()
        df = sweeps.tt_sweep(source, EMB, progress=lambda i, n: log(f"  tt {i}/{n}"), device=device)
        out["tt_sweep"] = {"tensor": EMB, "seconds": time.perf_counter() - t0,
                           "rows": df.drop(columns=["tt_shape"]).to_dict(orient="records")}
    targets = {"default_model_p95_s": 0.3, "random_12288x4096_p95_s": 2.0, "tt_sweep_s": 60.0}
    out["targets"] = targets
    out["met"] = {
        "default_model": all(r["moves"]["p95_s"] < targets["default_model_p95_s"]
                             for r in out["svd_moves"][:2] + out["int_moves"][:2]),
        **({"random_12288x4096": all(r["moves"]["p95_s"] < targets["random_12288x4096_p95_s"]
                                     for r in (out["svd_moves"][2], out["int_moves"][2])),
            "tt_sweep": out["tt_sweep"]["seconds"] < targets["tt_sweep_s"]} if not args.quick else {})}
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
