"""Methods bench (issue 11): RTN vs GPTQ vs HQQ, plain vs whitened SVD, every point a real run.

Each plan goes through ``python -m sahc_core run`` (assembly, gates, perplexity against the cached
baseline) on the embedded default model and the default corpus (whole test text, window 2048), in a
subprocess whose peak RSS is read back. Prints ONE JSON object: per run the projected / actual ratio,
perplexity, Δppl against the baseline, the gates failed (by kind), the stage times (calibration
capture, assembly = the method over the whole model, gates, perplexity) and the peak RSS; then the
summary the issue asks for: the share of RTN's perplexity increase that GPTQ (and HQQ) recover at
int4 and int3, and whether any method beats uniform RTN int4 at equal bytes.

    .venv/bin/python bench/methods.py                     # all plans, whole test text (long: ~10 runs)
    .venv/bin/python bench/methods.py --max-tokens 4096   # a quick check (labelled as such in the JSON)
    .venv/bin/python bench/methods.py --only rtn4 gptq4   # some plans

Plans (SmolLM2-135M: hidden 576, intermediate 1536, 30 layers):
- ``rtn4`` / ``gptq4`` / ``hqq4``: int4 asym, groups of 128 with the g64 fallback (``plans/int4-g128.json``);
- ``rtn3`` / ``gptq3`` / ``hqq3``: int3 asym, groups of 64;
- ``svd20`` / ``wsvd20``: the SVD-LLM paper's setting: 16-bit factors with ranks r = 0.8·m·n/(m+n) so every
  FFN and attention matrix keeps 80 % of its parameters (embedding kept in 16-bit);
- ``svd_eq4`` / ``wsvd_eq4``: 16-bit factors at (just under) the bytes of int4 (r = 0.275·m·n/(m+n)), the rest int4-g64.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INT4 = {"method": "int", "bits": 4, "group_size": 128, "scheme": "asym"}
INT4_FB = {"method": "int", "bits": 4, "group_size": 64, "scheme": "asym"}
#: (m, n) of SmolLM2's projections by name pattern, to turn a parameter share into a rank fraction.
SHAPES = {"*mlp.gate_proj*": (1536, 576), "*mlp.up_proj*": (1536, 576), "*mlp.down_proj*": (576, 1536),
          "*self_attn.q_proj*": (576, 576), "*self_attn.o_proj*": (576, 576),
          "*self_attn.k_proj*": (192, 576), "*self_attn.v_proj*": (192, 576)}


def _svd_overrides(method: str, keep_share: float) -> list[dict]:
    """Overrides giving each projection the rank whose 16-bit factors hold ``keep_share`` of its weights:
    r (m + n) = keep_share · m n, as a fraction of min(m, n)."""
    out = []
    for pattern, (m, n) in SHAPES.items():
        r = keep_share * m * n / (m + n)
        out.append({"pattern": pattern, "method": method, "rank_fraction": round(r / min(m, n), 6), "bits": None})
    return out


def plans() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for tag, method in (("rtn", "int"), ("gptq", "gptq"), ("hqq", "hqq")):
        int4 = {**INT4, "method": method}
        fb = {**INT4_FB, "method": method}
        if method == "hqq":
            int4.pop("scheme"), fb.pop("scheme")
        out[f"{tag}4"] = {"name": f"bench-{tag}4", "default": int4, "fallback": fb}
        int3 = {**INT4_FB, "method": method, "bits": 3}
        if method == "hqq":
            int3.pop("scheme")
        out[f"{tag}3"] = {"name": f"bench-{tag}3", "default": int3}
    for tag, method in (("svd", "svd"), ("wsvd", "wsvd")):
        out[f"{tag}20"] = {"name": f"bench-{tag}20", "default": {"method": "keep"},
                           "overrides": _svd_overrides(method, 0.8)}
        out[f"{tag}_eq4"] = {"name": f"bench-{tag}-eq4", "default": INT4_FB,
                             "overrides": _svd_overrides(method, 0.275)}
    return out


def run_plan(plan: dict, cache: str, max_tokens: int | None) -> dict:
    """One ``python -m sahc_core run`` in a child process: its JSON result, wall time and peak RSS."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(plan, fh)
    cmd = [sys.executable, "-m", "sahc_core", "run", "--plan", fh.name, "--cache", cache, "--json"]
    if max_tokens:
        cmd += ["--max-tokens", str(max_tokens)]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    wall = time.perf_counter() - t0
    os.unlink(fh.name)
    if proc.returncode != 0:
        return {"plan": plan["name"], "rc": proc.returncode, "error": (stderr.strip().splitlines() or ["?"])[-1],
                "seconds_wall": wall}
    res = json.loads(stdout.strip().splitlines()[-1])
    failed: dict[str, int] = {}
    for g in res["gates"]:
        if not g["passed"]:
            failed[g["gate"]] = failed.get(g["gate"], 0) + 1
    return {"plan": plan["name"], "rc": 0, "ratio_projected": res["ratio_projected"], "ratio_actual": res["ratio_actual"],
            "bytes_actual": res["bytes_actual"], "ppl": res["ppl"], "baseline_ppl": res["baseline_ppl"],
            "delta_ppl_pct": 100 * (res["ppl"] / res["baseline_ppl"] - 1), "gates_failed": failed,
            "n_gates": len(res["gates"]), "seconds": res["seconds"], "seconds_wall": wall,
            "peak_rss_gb": usage.ru_maxrss / 2**20,
            "tokens": res["protocol"]["tokens"], "run_id": res["run_id"]}


def summary(rows: dict[str, dict]) -> dict:
    """Recovered share of RTN's perplexity increase; the best plan at (at most) int4's bytes."""
    out: dict[str, object] = {}
    for bits in (4, 3):
        rtn = rows.get(f"rtn{bits}")
        for tag in ("gptq", "hqq"):
            other = rows.get(f"{tag}{bits}")
            if rtn and other and rtn.get("rc") == 0 and other.get("rc") == 0:
                inc = rtn["ppl"] - rtn["baseline_ppl"]
                out[f"{tag}{bits}_recovers_of_rtn_increase"] = (rtn["ppl"] - other["ppl"]) / inc if inc > 0 else None
    rtn4 = rows.get("rtn4")
    if rtn4 and rtn4.get("rc") == 0:
        at = [r for r in rows.values() if r.get("rc") == 0 and r["bytes_actual"] <= rtn4["bytes_actual"] * 1.001]
        best = min(at, key=lambda r: r["ppl"])
        out["best_at_int4_bytes"] = {"plan": best["plan"], "ppl": best["ppl"], "rtn4_ppl": rtn4["ppl"],
                                     "beats_rtn4": best["plan"] != rtn4["plan"] and best["ppl"] < rtn4["ppl"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="plan tags (default: all)")
    ap.add_argument("--max-tokens", type=int, help="score only the first N test tokens (a quick check)")
    ap.add_argument("--cache", default=str(REPO / "cache" / "sahc.duckdb"))
    args = ap.parse_args()
    all_plans = plans()
    tags = args.only or list(all_plans)
    rows = {}
    for tag in tags:
        rows[tag] = run_plan(all_plans[tag], args.cache, args.max_tokens)
        print(f"{tag}: {rows[tag].get('ppl', rows[tag].get('error'))}", file=sys.stderr)
    print(json.dumps({"bench": "methods", "protocol": "whole test text" if not args.max_tokens
                      else f"first {args.max_tokens} test tokens (quick check, not the issue's protocol)",
                      "window": 2048, "runs": rows, "summary": summary(rows)}))


if __name__ == "__main__":
    main()
