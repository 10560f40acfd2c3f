"""The CLI ``optimize`` command: the plan of least predicted damage for one or more target ratios.

``python -m sahc_core optimize --target-ratio 4.5 [5 ...] [--constraints keep=embedding only=int,gptq
max-bits=embedding:8 one-group-size] [--methods int,gptq] [--no-calib] [--ray auto|local[:N]|ADDRESS]
[--out plan.json] [--save] --json``

One target: the design.md keys (``ratio_projected``, ``bytes_projected``, ``predicted``, ``status``,
``plan``) plus ``message``, ``notes``, ``seconds``; an unreachable target is an error line naming the
best reachable ratio. Several targets (the frontier mode): ``frontier`` holds one such object per
target, unreachable ones with ``plan: null``. ``--ray``: the candidate measurements (the expensive
stage) run as one Ray task per tensor (:mod:`sahc_core.plans._ray_candidates`). Wired into
:mod:`sahc_core.cli.main` by :func:`add_optimize_parser`.
"""
from __future__ import annotations

import argparse
from typing import Any


def _ints(text: str, flag: str, none_words: tuple[str, ...] = ()) -> tuple[Any, ...]:
    out: list[Any] = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.lower() in none_words:
            out.append(None)
            continue
        try:
            out.append(int(item))
        except ValueError:
            raise ValueError(f"{flag} takes comma-separated integers"
                             f"{' or ' + '/'.join(none_words) if none_words else ''}, got {text!r}.") from None
    return tuple(out)


def _grid(args: argparse.Namespace):
    from sahc_core.plans.candidates import CandidateGrid

    kw: dict[str, Any] = {}
    if args.methods:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.bits:
        kw["bits"] = _ints(args.bits, "--bits")
    if args.calibrated_bits:
        kw["calibrated_bits"] = _ints(args.calibrated_bits, "--calibrated-bits")
    if args.group_sizes:
        kw["group_sizes"] = _ints(args.group_sizes, "--group-sizes", ("row", "none"))
    if args.rank_fractions:
        try:
            kw["rank_fractions"] = tuple(float(x) for x in args.rank_fractions.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--rank-fractions takes numbers like 0.25,0.5, got {args.rank_fractions!r}.") from None
    if args.factor_bits:
        kw["factor_bits"] = _ints(args.factor_bits, "--factor-bits", ("fp16", "none"))
    if args.cos_threshold is not None:
        kw["cos_threshold"] = args.cos_threshold
    return CandidateGrid(**kw)


def cmd_optimize(args: argparse.Namespace) -> dict:
    """Prepare (cached), solve every target, write / save the plan of a single target."""
    from sahc_core.cli.common import _cache, _source, _tqdm_progress
    from sahc_core.plans.optimize import optimize, parse_constraints, prepare

    if args.out and len(args.target_ratio) > 1:
        raise ValueError("--out writes one plan; give one --target-ratio (or drop --out in the frontier mode).")
    if args.ray:  # a bad address or a missing extra before calibration and sensitivity run
        from sahc_core.runs.distributed import check_address

        check_address(args.ray)
    constraints = parse_constraints(args.constraints or [])
    grid = _grid(args)
    source, cache = _source(args), _cache(args)
    text = None
    if args.corpus:
        from sahc_core.io.corpus import load_corpus

        text = load_corpus(args.corpus).calib_text
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            bars[stage] = _tqdm_progress(stage, "step")
        bars[stage][0](done, total)

    try:
        prep = prepare(source, cache, calibration=not args.no_calib, grid=grid, text=text, device=args.device,
                       progress=progress, ray=args.ray)
    finally:
        for _, close in bars.values():
            close()
    results = optimize(prep, args.target_ratio, constraints, name=args.name, time_limit=args.time_limit)
    common = {"model": str(source.path), "notes": prep.notes, "n_candidates": int(len(prep.candidates)),
              "n_feasible": int(prep.candidates["feasible"].sum()), "original_bytes": prep.original_bytes,
              "seconds_prepare": prep.seconds}
    if len(results) > 1:
        return {**common, "frontier": [r.to_json() for r in results]}
    res = results[0]
    if res.plan is None:
        from sahc_core.errors import PlanError

        raise PlanError(res.solution.message)
    if args.out:
        res.plan.to_json(args.out)
    if args.save:
        from sahc_core.plans.plan import save_plan

        if cache is None:
            raise ValueError("--save stores the plan in the cache; drop --no-cache to use it.")
        save_plan(cache, res.plan)
    return {**common, **res.to_json(), "out": args.out}


def add_optimize_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``optimize`` sub-command (with the shared ``common`` flags) to ``sub``."""
    help_ = "the mixed plan of least predicted damage for a target ratio (several: the optimal frontier)"
    sp = sub.add_parser("optimize", parents=[common], help=help_, description=help_)
    sp.set_defaults(func=cmd_optimize)
    sp.add_argument("--target-ratio", type=float, nargs="+", required=True, help="total ratio(s) vs 16-bit, e.g. 4.5")
    sp.add_argument("--constraints", nargs="+", metavar="RULE",
                    help="keep=COMP[,COMP], only=METHOD[,METHOD], max-bits=COMP:BITS, min-bits=COMP:BITS, "
                         "one-group-size")
    sp.add_argument("--out", help="write the plan JSON here (one target)")
    sp.add_argument("--save", action="store_true", help="save the plan in the cache (Budget / Runs pages list it)")
    sp.add_argument("--name", help="plan name (default optimized-<ratio>x)")
    sp.add_argument("--methods", help="comma-separated methods to try (default: every registered method)")
    sp.add_argument("--bits", help="code widths of calibration-free quantizers (default 2,3,4,5,6,8)")
    sp.add_argument("--calibrated-bits", help="code widths of calibration-aware quantizers (default 2,3,4)")
    sp.add_argument("--group-sizes", help="quantizer group sizes, 'row' = per row (default 64,128,row)")
    sp.add_argument("--rank-fractions", help="low-rank methods' rank fractions (default 0.25,0.5)")
    sp.add_argument("--factor-bits", help="low-rank factor widths, 'fp16' = unquantized (default 4,8)")
    sp.add_argument("--cos-threshold", type=float, help="output-cosine gate (default 0.95)")
    sp.add_argument("--no-calib", action="store_true",
                    help="no calibration statistics: calibration-free candidates, weight error as the damage")
    sp.add_argument("--corpus", help="calibration text file or folder (default: the embedded Shakespeare split)")
    sp.add_argument("--ray", metavar="auto|local[:N]|ADDRESS",
                    help="one Ray task per tensor with candidates to measure, on a cluster (needs the ray extra); "
                         "the cache is written here")
    sp.add_argument("--time-limit", type=float, default=30.0, help="solver seconds per target (default 30)")
    return sp
