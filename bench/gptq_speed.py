"""GPTQ speed bench: every linear weight of the embedded default model (SmolLM2-135M, 30 layers x
q, k, v, o, gate, up, down = 210 matrices), int4 g64 asym by default (128 does not divide 576).

The Hessians are NOT real calibration statistics (capturing those is another module's job): one
``H = XᵀX`` per input width (576, 1536) from random correlated activations ``X = Z A`` (``tokens``
rows, ``A`` with singular values decaying as ``i^-1`` and a few 10x outlier channels), reused for every
matrix of that width. GPTQ's run time does not depend on the values. Only ``gptq_quantize`` is timed
(the reads of the weights are not). Target: all 210 in under 2 minutes on 2 CPU cores.

Runs at ``nice 10`` with ``torch.set_num_threads(threads)``. Prints ONE JSON object on stdout
(progress on stderr): total wall seconds, total CPU seconds of the process (user + system: on
shared, busy cores the wall time mostly measures the neighbours, and with 2 threads OpenMP's
waiting for a descheduled thread; the load average is reported next to it), seconds per shape,
threads, the config, and the mean ratio ``‖X(W−Ŵ_gptq)ᵀ‖ / ‖X(W−Ŵ_rtn)ᵀ‖`` on the random
activations as a sanity figure. One untimed call first warms MKL up.

    .venv/bin/python bench/gptq_speed.py                 # all 210 linears, 2 threads
    .venv/bin/python bench/gptq_speed.py --layers 2      # the first 2 layers only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402
from sahc_core.methods import quant  # noqa: E402
from sahc_core.methods._gptq import gptq_quantize  # noqa: E402

_LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.\w+_proj\.weight$")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def correlated_activations(tokens: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``(tokens, n)`` float32 ``Z A``: ``A = U diag(i^-1) Vᵀ`` with 4 input channels scaled 10x."""
    U = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    A = (U * torch.arange(1, n + 1, dtype=torch.float32) ** -1.0) @ V.T  # (n, n)
    X = torch.randn(tokens, n, generator=gen) @ A.T
    X[:, torch.randperm(n, generator=gen)[:4]] *= 10
    return X


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--scheme", default="asym")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False)
    args = ap.parse_args()
    os.nice(10)
    torch.set_num_threads(args.threads)
    cfg = quant.QuantConfig(args.bits, args.group_size, args.scheme)

    source = ModelSource.open(default_model_dir(progress=log))
    names = [t.name for t in source.tensors() if _LINEAR.match(t.name)
             and (args.layers is None or int(_LINEAR.match(t.name).group(1)) < args.layers)]
    gen = torch.Generator().manual_seed(0)
    acts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    per_shape: dict[str, dict] = defaultdict(lambda: {"count": 0, "seconds": 0.0})
    ratios, total, cpu = [], 0.0, 0.0
    load_start = os.getloadavg()[0]
    warm = torch.randn(64, 576, generator=gen)
    gptq_quantize(warm, torch.eye(576, dtype=torch.float64), quant.QuantConfig(args.bits, args.group_size, args.scheme))
    for k, name in enumerate(names):
        W = source.read(name, dtype=torch.float32)
        n = W.shape[1]
        if n not in acts:
            X = correlated_activations(args.tokens, n, gen)
            acts[n] = (X, (X.T.double() @ X.double()))
        X, H = acts[n]
        t0, c0 = time.perf_counter(), time.process_time()
        res = gptq_quantize(W, H, cfg, block_size=args.block_size, act_order=args.act_order)
        dt = time.perf_counter() - t0
        total += dt
        cpu += time.process_time() - c0
        entry = per_shape["x".join(map(str, W.shape))]
        entry["count"] += 1
        entry["seconds"] += dt
        rtn = quant.fake_quantize(W, cfg)
        ratios.append(float(torch.linalg.norm(X @ (W - res.w_hat).T) / torch.linalg.norm(X @ (W - rtn).T)))
        log(f"[{k + 1}/{len(names)}] {name} {tuple(W.shape)} {dt:.2f}s (total {total:.1f}s)")
    out = {
        "matrices": len(names), "total_seconds": round(total, 2), "total_cpu_seconds": round(cpu, 2),
        "per_shape": {s: {"count": e["count"], "seconds": round(e["seconds"], 2),
                          "mean_seconds": round(e["seconds"] / e["count"], 3)} for s, e in per_shape.items()},
        "threads": torch.get_num_threads(), "config": cfg.to_dict(), "block_size": args.block_size,
        "act_order": args.act_order, "tokens": args.tokens,
        "output_error_ratio_gptq_over_rtn_mean": round(sum(ratios) / len(ratios), 4),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "load_avg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
