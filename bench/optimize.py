"""Plan-optimizer bench: optimised mixed plans vs uniform RTN int-k at the same bytes, every point a real run.

On the embedded default model (SmolLM2-135M) and the default corpus (Shakespeare test split, window
2048): the uniform plans int3-g64, int4-g64, int4-g128 (g64 fallback) and int8 (per row) are run;
the optimizer then solves, in one frontier pass, the plans of least predicted damage at each uniform
plan's projected ratio and at 4.5x and 5x, and each is run too. Prints ONE JSON object: the per-run
table (ratio, perplexity, gates, predicted Δloss), the comparison at each uniform ratio (is the
optimised plan's perplexity lower with no more bytes?), the 5x verdict, Spearman's ρ between
predicted Δloss and measured Δ log ppl, and the optimizer's timings (cached solve < 10 s).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/optimize.py --max-tokens 4096   # a check
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/optimize.py                     # whole text

A finished run of the same plan (provenance aside) and protocol in the cache is reused, so an
interrupted bench resumes. On a CPU machine shared by others one thread is much faster than two
(``OMP_NUM_THREADS=1``): oversubscribed OpenMP threads spin.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import replace
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sahc_core.cache import Cache, from_json  # noqa: E402
from sahc_core.io.default_model import default_model_dir  # noqa: E402
from sahc_core.io.source import ModelSource  # noqa: E402
from sahc_core.jsonutil import jsonable  # noqa: E402
from sahc_core.plans.candidates import CandidateGrid  # noqa: E402
from sahc_core.plans.optimize import optimize, prepare, with_prediction  # noqa: E402
from sahc_core.plans.plan import CompressionPlan, example_plans, project  # noqa: E402
from sahc_core.runs.frontier import prediction_check, run_points, to_records  # noqa: E402
from sahc_core.runs.pipeline import execute_run  # noqa: E402

UNIFORM = (
    {"name": "int3-g64", "default": {"method": "int", "bits": 3, "group_size": 64}},
    {"name": "int4-g64", "default": {"method": "int", "bits": 4, "group_size": 64}},
    {"name": "int4-g128", "default": {"method": "int", "bits": 4, "group_size": 128},
     "fallback": {"method": "int", "bits": 4, "group_size": 64}},
    {"name": "int8", "default": {"method": "int", "bits": 8, "group_size": None}},
)
EXTRA_TARGETS = (4.5, 5.0)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _same_plan(a: dict, b: dict) -> bool:
    strip = ("provenance", "description")
    return {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}


def _finished(cache: Cache, plan: CompressionPlan, fp: str, window: int, max_tokens: int | None) -> dict | None:
    """The result of a finished run of this plan and protocol, if the cache has one."""
    rows = cache.execute("SELECT plan, result FROM runs WHERE status = 'done' AND model_fp = ? ORDER BY started_at DESC",
                         [fp])
    for plan_json, res_json in rows:
        res = from_json(res_json) or {}
        proto = res.get("protocol") or {}
        if (_same_plan(from_json(plan_json) or {}, plan.to_dict()) and proto.get("window") == window
                and proto.get("max_tokens") == max_tokens):
            return res
    return None


def _run(cache: Cache, plan: CompressionPlan, model_dir: Path, fp: str, window: int, max_tokens: int | None) -> dict:
    hit = _finished(cache, plan, fp, window, max_tokens)
    if hit is not None:
        _log(f"{plan.name}: reusing run {hit['run_id']}")
        return hit
    _log(f"{plan.name}: running")
    t0 = time.perf_counter()
    res = execute_run(cache, plan, model_dir, window=window, max_tokens=max_tokens, device="cpu")
    _log(f"{plan.name}: ppl {res['ppl']:.3f} at {res['ratio_actual']:.3f}x in {time.perf_counter() - t0:.0f} s")
    return res


def _failed(res: dict) -> list[str]:
    return sorted({f"{g['gate']} {g['tensor']}" for g in res.get("gates", []) if not g["passed"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, help="evaluate only the first N test tokens (default: the whole text)")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--methods", help="comma-separated methods the optimizer may use (default: every registered one)")
    ap.add_argument("--hand", default="", help="comma-separated shipped example plans (plans/*.json) to run too, "
                                               "e.g. tt-embedding,int4-svd-ffn (the study-style hand plans)")
    ap.add_argument("--no-runs", action="store_true", help="optimise and predict only")
    ap.add_argument("--plans", help="comma-separated plan names to run (default: all), e.g. int3-g64,opt-5x for a check")
    args = ap.parse_args()

    cache, model_dir = Cache(), default_model_dir()
    source = ModelSource.open(model_dir)
    grid = CandidateGrid(methods=tuple(args.methods.split(",")) if args.methods else None)
    t0 = time.perf_counter()
    prep = prepare(source, cache, grid=grid, device="cpu",
                   progress=lambda stage, d, t: _log(f"{stage} {d}/{t}") if d == t or d % 25 == 0 else None)
    t_prepare = time.perf_counter() - t0
    uniform = [with_prediction(CompressionPlan.from_dict(d), prep, "uniform") for d in UNIFORM]
    ratios = [project(p, source)["ratio_projected"] for p in uniform]
    examples = example_plans()
    hand = [with_prediction(examples[n], prep, "hand") for n in args.hand.split(",") if n]
    targets = [r * (1 - 1e-9) for r in ratios] + list(EXTRA_TARGETS)  # at most the uniform plan's bytes
    t0 = time.perf_counter()
    again = prepare(source, cache, grid=grid, device="cpu")  # everything cached now: what a second call costs
    t_prepare_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    solved = optimize(again, targets)
    t_solve = time.perf_counter() - t0
    names = [f"opt@{u.name}" for u in uniform] + [f"opt-{r:g}x" for r in EXTRA_TARGETS]
    mix = {name: dict(Counter(s.solution.choice.loc[s.solution.choice["ndim"] >= 2, "label"]).most_common(6))
           for name, s in zip(names, solved) if s.plan is not None}
    optimised = [replace(s.plan, name=name) for name, s in zip(names, solved) if s.plan is not None]
    results: dict[str, dict] = {}
    if not args.no_runs:
        wanted = set(args.plans.split(",")) if args.plans else None
        for plan in [*uniform, *optimised, *hand]:
            if wanted is not None and plan.name not in wanted:
                continue
            results[plan.name] = _run(cache, plan, model_dir, source.fingerprint, args.window, args.max_tokens)
    ids = {r["run_id"] for r in results.values()}
    pts = run_points(cache, source.fingerprint)
    pts = pts[pts["run_id"].isin(ids)]
    by_name = {p.name: p for p in [*uniform, *optimised, *hand]}
    table = []
    for name, plan in by_name.items():
        res = results.get(name, {})
        prov = plan.provenance or {}
        table.append({"plan": name, "kind": prov.get("kind"), "ratio_projected": project(plan, source)["ratio_projected"],
                      "ratio_actual": res.get("ratio_actual"), "bytes": res.get("bytes_projected"),
                      "ppl": res.get("ppl"), "baseline_ppl": res.get("baseline_ppl"),
                      "delta_log_ppl": math.log(res["ppl"] / res["baseline_ppl"]) if res.get("ppl") else None,
                      "predicted_dloss": prov.get("predicted_dloss"), "gates_failed": res.get("gates_failed"),
                      "failed": _failed(res)[:8], "run_id": res.get("run_id"), "top_settings": mix.get(name)})
    compare = []
    for u, s in zip(uniform, solved[: len(uniform)]):
        ru, ro = results.get(u.name), results.get(f"opt@{u.name}")
        compare.append({"uniform": u.name, "ratio": project(u, source)["ratio_projected"],
                        "optimised_ratio": s.solution.ratio, "optimised_status": s.solution.status,
                        "uniform_ppl": ru and ru["ppl"], "optimised_ppl": ro and ro["ppl"],
                        "bytes_ok": bool(s.plan is not None and s.solution.bytes <= project(u, source)["bytes_projected"]),
                        "ppl_lower": bool(ru and ro and ro["ppl"] < ru["ppl"]),
                        "uniform_predicted": u.provenance["predicted_dloss"], "optimised_predicted": s.solution.damage})
    five = solved[-1]
    r5 = results.get("opt-5x")
    verdict = ({"reached": True, "ratio": five.solution.ratio, "predicted_dloss": five.solution.damage,
                "ppl": r5 and r5["ppl"], "baseline_ppl": r5 and r5["baseline_ppl"],
                "gates_failed": r5 and r5["gates_failed"], "failed": _failed(r5 or {})}
               if five.plan is not None else {"reached": False, "message": five.solution.message})
    chk = prediction_check(pts)
    out = {"bench": "optimize", "model": str(model_dir), "fingerprint": source.fingerprint,
           "protocol": {"window": args.window, "max_tokens": args.max_tokens,
                        "tokens": next((r["protocol"]["tokens"] for r in results.values()), None)},
           "grid": {"methods": grid.methods or "all registered", "n_candidates": int(len(prep.candidates)),
                    "n_feasible": int(prep.candidates["feasible"].sum()), "notes": prep.notes},
           "seconds": {"prepare": t_prepare, "prepare_cached": t_prepare_cached, "solve_all_targets": t_solve,
                       "stages": prep.seconds},
           "runs": table, "compare_at_uniform_ratios": compare, "five_x": verdict,
           "spearman": {"rho": chk["spearman"], "n": chk["n"], "pearson_log": chk["pearson_log"],
                        "median_measured_over_predicted": chk["median_ratio"]},
           "points": to_records(pts),
           "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()}}
    print(json.dumps(jsonable(out, nonfinite="string")))


if __name__ == "__main__":
    main()
