"""HQQ speed and error on the default model's largest tensors, against RTN and the ``hqq`` package.

Cases: the 49152×576 embedding and a 1536×576 FFN projection at int4 g64 and int3 g64, and the
576×1536 down projection at int4 g128 (the lead's reference case). For each: our solver's seconds,
relative error, RTN's relative error (same grid) and iterations; with ``--with-hqq`` also the
``hqq`` package's seconds and relative error (its own float32 scale/zero, before any fp16 storage).

Prints ONE JSON object on stdout (progress on stderr). Run under ``nice`` on a shared machine, and
with ``--threads 1`` there: with other jobs on the cores, torch's intra-op threads wait for each
other on every small op (measured: embedding int4 100 s with 2 threads against 5.7 s with 1).

    nice -n 10 .venv/bin/python bench/hqq_speed.py [--with-hqq] [--threads N] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.device import resolve_device  # noqa: E402
from sahc_core.methods._hqq import hqq_solve  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402
from sahc_core.methods.quant import QuantConfig  # noqa: E402

CASES = [
    ("model.embed_tokens.weight", 4, 64),
    ("model.embed_tokens.weight", 3, 64),
    ("model.layers.15.mlp.gate_proj.weight", 4, 64),
    ("model.layers.15.mlp.gate_proj.weight", 3, 64),
    ("model.layers.15.mlp.down_proj.weight", 4, 128),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def hqq_package(W: torch.Tensor, bits: int, group_size: int, device: str) -> dict:
    """The ``hqq`` package's optimiser (its ``Quantizer.quantize`` defaults, groups along rows)."""
    from hqq.core.quantize import Quantizer

    t0 = time.perf_counter()
    W_q, meta = Quantizer.quantize(W, nbits=bits, group_size=group_size, axis=1, optimize=True, bitpack=False,
                                   device=device)
    seconds = time.perf_counter() - t0
    W_hat = ((W_q.float() - meta["zero"]) * meta["scale"]).reshape(W.shape)
    return {"hqq_seconds": seconds, "hqq_rel_error": float((W - W_hat).norm() / W.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--with-hqq", action="store_true", help="also time the hqq package on the same tensors")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out: dict = {"bench": "hqq_speed", "device": device, "torch_threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "platform": platform.platform(),
                 "note": "a load_avg_start above cpu_count means other jobs shared the CPU (seconds inflated)",
                 "cases": []}
    source = ModelSource.open(default_model_dir())
    hqq_solve(torch.randn(64, 128), QuantConfig(4, 64), device=device)  # warm-up (first-call allocations)
    for name, bits, g in CASES:
        W = source.read(name, dtype=torch.float32).to(device)
        res = hqq_solve(W, QuantConfig(bits, g), device=device)
        row = {"tensor": name, "shape": list(W.shape), "bits": bits, "group_size": g, "seconds": res.seconds,
               "rel_error": res.rel_error, "rtn_rel_error": res.rtn_rel_error, "iterations": res.iterations}
        if args.with_hqq:
            row.update(hqq_package(W, bits, g, device))
        log(f"  {name} int{bits} g{g}: {row}")
        out["cases"].append(row)
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
