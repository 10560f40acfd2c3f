"""Runs bench: the shipped plans (plans/*.json) through ``python -m sahc_core run``, as README's runs table.

Each plan runs in its own process (exactly the CLI a user types), one after another on ONE fresh cache,
so the baseline perplexity is computed by the first run and reused by the others, as in README. Per
run: ratio projected / actual, perplexity, baseline, Δppl %, the perplexity gate and its threshold,
gates failed by gate name (kind, weak or not: ``gates.gate_summary``), the stage times, the wall time
and the peak RSS of the run process (``os.wait4``). A run that fails (exit != 0) is a row with its
one-line error. Prints ONE JSON object on stdout (progress on stderr).

    .venv/bin/python bench/runs.py                    # the whole test text (about 2 min per plan on 2 idle cores)
    .venv/bin/python bench/runs.py --max-tokens 4096  # a quick check (the perplexities are not README's)
    .venv/bin/python bench/runs.py --plans plans/int8.json plans/int4-g128.json --ppl-threshold 0.25
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sahc_core.gates import gate_summary  # noqa: E402


def run_plan(plan: Path, cache: Path, max_tokens: int | None, ppl_threshold: float | None,
             device: str) -> dict:
    """One ``python -m sahc_core run`` process: its JSON result (or error), wall seconds and peak RSS."""
    cmd = [sys.executable, "-m", "sahc_core", "run", "--plan", str(plan), "--cache", str(cache), "--json",
           "--device", device]
    if max_tokens is not None:
        cmd += ["--max-tokens", str(max_tokens)]
    if ppl_threshold is not None:
        cmd += ["--ppl-threshold", str(ppl_threshold)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage (ru_maxrss in KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    row: dict = {"plan": plan.stem, "rc": proc.returncode, "wall_s": round(wall, 1),
                 "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}
    if proc.returncode != 0:
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        return {**row, "error": errors[-1] if errors else " ".join(stderr.strip().splitlines()[-1:])}
    res = json.loads(stdout.strip().splitlines()[-1])
    summary = gate_summary(res["gates"])
    base, ppl = res["baseline_ppl"], res["ppl"]
    return {**row, "ratio_projected": round(res["ratio_projected"], 3), "ratio_actual": round(res["ratio_actual"], 3),
            "ppl": ppl, "baseline_ppl": base,
            "delta_ppl_pct": round(100 * (ppl - base) / base, 2) if isinstance(ppl, float) else None,
            "ppl_threshold_pct": 100 * res["ppl_threshold"], "tokens": res["protocol"]["tokens"],
            "window": res["protocol"]["window"], "gates_total": len(res["gates"]), "gates_failed": res["gates_failed"],
            "gates_by_gate": {r.gate: {"kind": r.kind, "weak": bool(r.weak), "failed": int(r.n_failed), "n": int(r.n)}
                              for r in summary.itertuples()},
            "seconds": {k: round(v, 1) for k, v in res["seconds"].items()}, "baseline_cached": res["baseline_cached"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", nargs="+", type=Path, default=sorted((ROOT / "plans").glob("*.json")))
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens (default: the whole test text)")
    p.add_argument("--ppl-threshold", type=float, help="the perplexity gate (default the CLI's 0.10)")
    p.add_argument("--cache", type=Path, help="DuckDB cache to use (default: a fresh one, deleted afterwards)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sahc-bench-runs-") as tmp:
        cache = args.cache or Path(tmp) / "bench.duckdb"
        rows = []
        for plan in args.plans:
            print(f"[bench/runs] {plan.name} ...", file=sys.stderr, flush=True)
            rows.append(run_plan(plan, cache, args.max_tokens, args.ppl_threshold, args.device))
            print(f"[bench/runs] {plan.name}: {json.dumps(rows[-1])[:300]}", file=sys.stderr, flush=True)
    print(json.dumps({"bench": "runs", "max_tokens": args.max_tokens, "device": args.device,
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                  "load_avg_1m": round(os.getloadavg()[0], 2)}, "runs": rows}))


if __name__ == "__main__":
    main()
