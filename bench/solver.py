"""Plan-optimizer bench: seconds to the optimal plan on synthetic candidate tables of real model sizes.

Tables (``tests/synthetic_candidates.py``, seeded): SmolLM2-135M-sized (211 tensors x 40 options, the
embedded default) and Qwen3.5-9B-sized (800 tensors x 40 options). For each size and target ratio
it times :func:`sahc_core.plans._solver.solve` (``method="auto"``: Lagrangian + reduced-cost fixing
+ HiGHS) and, with ``--cross-check``, ``method="milp"`` (HiGHS on the whole Pareto-reduced table),
and one :func:`frontier` call over all the targets. Targets: < 10 s (211 x 40) and < 30 s (800 x 40)
per solve.

Prints ONE JSON object on stdout: per size, per target ``seconds``, ``status``, ``rel_gap``,
``ratio``, ``damage`` (and the cross-check's), plus ``frontier_seconds`` and the worst case.

    .venv/bin/python bench/solver.py                    # both sizes, targets 2..8 (a minute on 2 busy cores)
    .venv/bin/python bench/solver.py --cross-check      # also time the plain MILP and compare damages
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sahc_core.plans._solver import frontier, solve  # noqa: E402
from synthetic_candidates import synthetic_candidates  # noqa: E402


def _row(sol) -> dict:
    rel = sol.gap / sol.damage if sol.damage > 0 else 0.0
    return {"seconds": round(sol.seconds, 3), "status": sol.status, "rel_gap": rel, "ratio": round(sol.ratio, 4),
            "damage": sol.damage, "solver": sol.solver}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["smol", "qwen"], choices=["smol", "qwen"])
    parser.add_argument("--targets", nargs="+", type=float, default=[2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=30.0)
    parser.add_argument("--cross-check", action="store_true", help="also run method='milp' and compare")
    args = parser.parse_args()

    # HiGHS 1.12 (scipy 1.17) prints a stray debug line on the C stdout now and then (HiGHS issue
    # #2783); send the C stdout to stderr while solving so stdout carries only the JSON.
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    out: dict = {"python": platform.python_version(), "machine": platform.machine(), "sizes": {}}
    for size in args.sizes:
        df, orig = synthetic_candidates(size, seed=args.seed)
        budgets = [int(orig / r) for r in args.targets]
        entry: dict = {"tensors": int(df["tensor"].nunique()), "candidates": len(df), "targets": {}}
        for r, b in zip(args.targets, budgets):
            print(f"{size} {r}x ...", file=sys.stderr, flush=True)
            row = _row(solve(df, b, orig, time_limit=args.time_limit))
            if args.cross_check:
                ref = solve(df, b, orig, time_limit=args.time_limit, method="milp")
                row["milp"] = _row(ref)
                row["damage_rel_diff"] = (row["damage"] - ref.damage) / ref.damage if ref.damage > 0 else 0.0
            entry["targets"][f"{r:g}"] = row
        t0 = time.perf_counter()
        sols = frontier(df, budgets, orig, time_limit=args.time_limit)
        entry["frontier_seconds"] = round(time.perf_counter() - t0, 3)
        entry["frontier_status"] = sorted({s.status for s in sols})
        entry["max_seconds"] = max(v["seconds"] for v in entry["targets"].values())
        entry["max_rel_gap"] = max(v["rel_gap"] for v in entry["targets"].values())
        out["sizes"][size] = entry
    os.dup2(stdout_fd, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
