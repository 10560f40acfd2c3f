"""Study bench: the headline numbers README quotes about the default model, from one spectrum scan.

Parameter count and component shares, the FFN min rank for 10 % error as a fraction of full rank
(min / median / max over the FFN matrices) and σ₁/σ_min over the same matrices, plus the scan time
(cold on a fresh cache, then warm). The same numbers come with the study tables from
``python -m sahc_core report --out DIR --study --json`` (key ``study_figures``). Prints ONE JSON object.

    .venv/bin/python bench/study.py                 # the embedded default model (about 20 s cold on 2 cores)
    .venv/bin/python bench/study.py --model DIR     # any local model
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.cache import Cache  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402
from sahc_core.report.study import study_figures  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local HF model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.model:
        path = Path(args.model)
    else:
        from sahc_core.io.default_model import default_model_dir

        path = default_model_dir()
    source = ModelSource.open(path)
    with tempfile.TemporaryDirectory(prefix="sahc-bench-study-") as tmp:
        cache = Cache(Path(tmp) / "bench.duckdb")
        t0 = time.perf_counter()
        figures = study_figures(source, cache, args.device)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        study_figures(source, cache, args.device)
        warm = time.perf_counter() - t0
    print(json.dumps({"bench": "study", "model": str(path), "ffn_scan_seconds": {"cold": round(cold, 2),
                                                                                 "warm": round(warm, 3)},
                      "load_avg_1m": round(os.getloadavg()[0], 2), **figures}))


if __name__ == "__main__":
    main()
