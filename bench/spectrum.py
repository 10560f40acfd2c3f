"""Spectrum bench: our singular values vs torch / scipy / numpy, and a full scan cold and warm.

On the SAME matrices in one run (12288×4096 and 4096×4096 float32, random and with a decaying
spectrum, plus the embedded default model's largest tensor) it times

* ``ours``                 ``sahc_core.spectra.spectrum.singular_values(method="auto")`` (Gram in float64)
* ``torch_svdvals_f32``    ``torch.linalg.svdvals`` on the float32 matrix
* ``scipy_svd_f64``        ``scipy.linalg.svd(W.astype(float64), compute_uv=False)`` (WeightWatcher's CPU path)
* ``numpy_svd_f32``        ``numpy.linalg.svd(W, compute_uv=False)`` on the float32 array as stored

and reports for each the max |σ - σ_ref| / σ_max against the float64 reference (the scipy float64
values). Then it scans every 2-D weight of the default model into a temporary cache, cold and warm.
Prints ONE JSON object on stdout (progress on stderr).

    .venv/bin/python bench/spectrum.py            # everything (3 min on 2 idle CPU cores, 10+ min when they are busy)
    .venv/bin/python bench/spectrum.py --quick    # only the 4096×4096 matrices + the model
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.cache import Cache  # noqa: E402
from sahc_core.spectra.scan import scan  # noqa: E402
from sahc_core.spectra.spectrum import _singular_values  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def decaying(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """U diag(σ) Vᵀ in float32 with σ_i = i^-1.5 (power law, 5+ decades over 4096 values)."""
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q  # (m, k) orthonormal columns
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q  # (n, k)
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -1.5
    return (U * sigma) @ V.T


def compare(W: torch.Tensor, device: str) -> dict:
    """Time every method on W (float32, 2-D) and measure its error against the float64 reference."""
    W = W.contiguous().float()
    A32 = W.numpy()
    runs: dict[str, dict] = {}
    ref, t = timed(lambda: scipy.linalg.svd(A32.astype(np.float64), compute_uv=False))
    runs["scipy_svd_f64"] = {"seconds": t}
    log(f"  scipy f64 {t:.2f}s")
    (s, used), t = timed(lambda: _singular_values(W, device, "auto"))
    runs["ours"] = {"seconds": t, "method": used, "device": device, "s": s}
    log(f"  ours ({used}) {t:.2f}s")
    s, t = timed(lambda: torch.linalg.svdvals(W.to(device)).double().cpu().numpy())
    runs["torch_svdvals_f32"] = {"seconds": t, "device": device, "s": s}
    log(f"  torch svdvals f32 {t:.2f}s")
    s, t = timed(lambda: np.linalg.svd(A32, compute_uv=False).astype(np.float64))
    runs["numpy_svd_f32"] = {"seconds": t, "s": s}
    log(f"  numpy f32 {t:.2f}s")
    runs["scipy_svd_f64"]["s"] = ref
    for r in runs.values():
        r["max_rel_err_vs_f64"] = float(np.max(np.abs(r.pop("s") - ref)) / ref[0])
    ours = runs["ours"]["seconds"]
    return {"shape": list(W.shape), "sigma_max": float(ref[0]), "sigma_min": float(ref[-1]), "runs": runs,
            "speedup_vs_scipy_f64": runs["scipy_svd_f64"]["seconds"] / ours,
            "speedup_vs_torch_svdvals_f32": runs["torch_svdvals_f32"]["seconds"] / ours}


def model_part(device: str, skip_scan: bool) -> dict:
    """Largest tensor of the default model through ``compare``, then a cold and a warm scan."""
    try:
        from sahc_core.io.default_model import default_model_dir
        from sahc_core.io.source import ModelSource

        source = ModelSource.open(default_model_dir())
    except Exception as exc:  # the bench reports what it could not do instead of failing
        return {"skipped": f"default model unavailable: {exc}"}
    big = max((t for t in source.tensors() if len(t.shape) >= 2), key=lambda t: t.numel)
    log(f"model tensor {big.name} {big.shape}")
    out: dict = {"model": str(source.path), "largest_tensor": {"name": big.name, **compare(source.read(big.name), device)}}
    if skip_scan:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "bench.duckdb")
        t0 = time.perf_counter()
        df = scan(source, cache=cache, device=device)
        cold = time.perf_counter() - t0
        log(f"scan cold {cold:.1f}s ({len(df)} tensors)")
        t0 = time.perf_counter()
        warm_df = scan(source, cache=cache, device=device)
        warm = time.perf_counter() - t0
        log(f"scan warm {warm:.2f}s")
    out["scan"] = {"n_tensors": len(df), "cold_seconds": cold, "warm_seconds": warm,
                   "warm_all_cached": bool(warm_df["cached"].all()),
                   "methods": df["method"].value_counts().to_dict()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the 12288×4096 matrices")
    ap.add_argument("--skip-scan", action="store_true", help="skip the full-model scan")
    ap.add_argument("--device", default="cpu", help="device for ours and torch svdvals (cpu, cuda)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    gen = torch.Generator().manual_seed(args.seed)
    shapes = [(4096, 4096)] if args.quick else [(12288, 4096), (4096, 4096)]
    matrices = []
    for m, n in shapes:
        for kind in ("random", "decaying"):
            log(f"{kind} {m}x{n}")
            W = torch.randn(m, n, generator=gen) * 0.02 if kind == "random" else decaying(m, n, gen)
            matrices.append({"matrix": f"{kind} {m}x{n} float32", **compare(W, args.device)})
            del W
    model = model_part(args.device, args.skip_scan)
    cases = matrices + ([model["largest_tensor"]] if "largest_tensor" in model else [])
    result = {
        "bench": "spectrum",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": args.device, "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "note": ("all methods ran on the same matrices in one run; a loadavg above the core count means other "
                 "jobs shared the CPU and absolute seconds are inflated. Reference = scipy float64 gesdd."),
        "accuracy_target": "max |Δσ| / σ_max < 1e-5 vs float64",
        "matrices": matrices,
        "default_model": model,
        "targets": {
            "ours_accurate_everywhere": all(c["runs"]["ours"]["max_rel_err_vs_f64"] < 1e-5 for c in cases),
            "min_speedup_vs_scipy_f64": min(c["speedup_vs_scipy_f64"] for c in cases),
            "min_speedup_vs_torch_svdvals_f32": min(c["speedup_vs_torch_svdvals_f32"] for c in cases),
            "goal": ">= 3x vs scipy f64, >= 1.5x vs torch svdvals f32",
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
