"""``python -m sahc_core COMMAND ...``: a thin argparse layer over the library.

Every command maps its flags onto one library call and prints the result; the dashboard pages call
the same functions. With ``--json`` the last line of stdout is one JSON object (the contract in
design.md). Errors: exit code != 0 and one clear line on stderr (a traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from sahc_core.errors import NumericalError, SahcError
from sahc_core.cli.common import _cache, _calib, _model_dir, _source, _tqdm_progress, _workspace
from sahc_core.jsonutil import jsonable

# Exit codes: 2 = bad input or parameters, 3 = out of memory, 4 = a numerical fault (NaN / Inf / empty
# tensor, non-finite perplexity), 130 = interrupted.
EXIT_INPUT, EXIT_OOM, EXIT_NUMERIC, EXIT_INTERRUPT = 2, 3, 4, 130


# ----------------------------------------------------------------------------------- commands
def cmd_inspect(args: argparse.Namespace) -> dict:
    from sahc_core.io.components import component_shares, is_known_architecture, tensor_table
    from sahc_core.io.dtypes import is_analysed
    from sahc_core.io.prequant import model_grids, summary

    source = _source(args)
    table = tensor_table(source)
    shares = component_shares(table)
    known = is_known_architecture(source.architecture)
    grids = {} if args.no_prequant else model_grids(source, cache=_cache(args))
    skipped = sorted({d for d in table["dtype"] if not is_analysed(d)})
    return {
        "model": str(source.path),
        "architecture": source.architecture,
        "known_architecture": known,
        "note": None if known else (
            f"unknown architecture {source.architecture!r}: components guessed from tensor names"),
        "non_float_note": None if not skipped else (
            f"{int((~table['dtype'].map(is_analysed)).sum())} tensor(s) are stored as {', '.join(skipped)}, not as "
            "floats: they are listed but not analysed or compressed"),
        "fingerprint": source.fingerprint,
        "tied_embeddings": source.tied_embeddings,
        "total_params": int(table["params"].sum()),
        "components": shares.to_dict(orient="records"),
        "prequantized": summary(grids) if grids else None,
        "tensors": [
            {"name": r.name, "shape": list(r.shape), "dtype": r.dtype, "component": r.component,
             "kind": r.kind, "params": int(r.params), "analysed": is_analysed(r.dtype),
             "prequantized": None if not grids.get(r.name) else {k: grids[r.name][k] for k in ("bits", "block")}}
            for r in table.itertuples()
        ],
    }


def cmd_spectrum(args: argparse.Namespace) -> dict:
    from sahc_core.spectra.spectrum import tensor_spectrum

    source = _source(args)
    out = tensor_spectrum(source, args.tensor, cache=_cache(args), device=args.device, adaptive_threads=True).to_json()
    calib = _calib(args, source)
    if calib is not None:  # the rank-vs-OUTPUT-error curve on calibration activations (whitened EYM)
        from sahc_core.spectra.whitened import output_rank_curve

        curve = output_rank_curve(source, args.tensor, calib, cache=_cache(args), device=args.device)
        out["output_rank_error"] = {"ranks": list(range(len(curve["output_error"]))),
                                    "rel_error": curve["output_error"]}
        out["min_rank_output"] = curve["min_rank_output"]
    return out


def cmd_scan(args: argparse.Namespace) -> dict:
    import time

    from sahc_core.spectra.scan import scan, scan_status

    source = _source(args)
    if args.status:  # what the cache holds and the ETA of the rest; computes nothing
        return {"model": str(source.path), "component": args.component,
                **scan_status(source, _cache(args), args.component, args.device)}
    update, close = _tqdm_progress("scan", "tensor")
    t0 = time.perf_counter()
    try:
        if args.ray:
            from sahc_core.runs.distributed import ray_scan

            df = ray_scan(source, component=args.component, cache=_cache(args), address=args.ray,
                          device=args.device, progress=update)
        else:
            df = scan(source, component=args.component, cache=_cache(args), device=args.device, progress=update,
                      adaptive_threads=True, batch=args.batch)
    finally:
        close()
    return {"model": str(source.path), "component": args.component, "n_tensors": len(df),
            "seconds": time.perf_counter() - t0, "ray": args.ray, "rows": df.to_dict(orient="records")}


def cmd_measure(args: argparse.Namespace) -> dict:
    from sahc_core.cli.method_flags import config_from_args
    from sahc_core.whatif.measure import measure_tensor

    source, cfg = _source(args), config_from_args(args)
    return measure_tensor(source, args.tensor, cfg, cache=_cache(args), device=args.device, workspace=_workspace(),
                          calib=_calib(args, source))


def cmd_methods(args: argparse.Namespace) -> dict:
    from sahc_core.methods import registry

    return {"methods": registry.schema()}


def cmd_sweep(args: argparse.Namespace) -> dict:
    from sahc_core.io.components import embedding_tensor, tensor_table
    from sahc_core.whatif.sweeps import tt_sweep

    source = _source(args)
    if args.tensor is None:  # the embedding, found by the component map (Qwen3.5: model.language_model.*)
        args.tensor = embedding_tensor(tensor_table(source))
        if args.tensor is None:
            raise ValueError("this model has no embedding or LM head to sweep; pass --tensor NAME.")
    kwargs: dict[str, Any] = {"bits": args.tt_bits, "cos_threshold": args.cos_threshold,
                              "cache": _cache(args), "device": args.device, "workspace": _workspace()}
    if args.ranks:
        kwargs["ranks_list"] = tuple(tuple(int(x) for x in r.split(",")) for r in args.ranks)
    update, close = _tqdm_progress("tt sweep", "config")
    try:
        df = tt_sweep(source, args.tensor, progress=update, **kwargs)
    finally:
        close()
    return {"tensor": args.tensor, "rows": df.to_dict(orient="records")}


def cmd_ppl(args: argparse.Namespace) -> dict:
    from sahc_core.io.corpus import default_corpus, load_corpus
    from sahc_core.evaluate.allocator import retain_freed_memory
    from sahc_core.evaluate.evaluator import Evaluator, dtype_note, plan_offload
    from sahc_core.evaluate.names import name_map_for
    from sahc_core.evaluate.perplexity import PplConfig, check_window

    cfg = PplConfig(window=args.window, stride=args.stride, max_tokens=args.max_tokens,
                    batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    source = _source(args)
    check_window(cfg, source.config)  # before the corpus is read and the model loaded
    names = name_map_for(source)  # and checkpoint names the evaluated model lacks
    corpus = load_corpus(args.corpus) if args.corpus else default_corpus()
    decision = plan_offload(args.offload, source, names, cfg, args.device)
    evaluator = Evaluator(source.path, names, cfg, args.device, offload=decision.offload)
    update, close = _tqdm_progress("perplexity", "tok")
    try:
        with retain_freed_memory():  # opt-in allocator tuning of the CLI process (see evaluate.allocator)
            res = evaluator.perplexity(corpus.test_text, progress=update)
    finally:
        close()
    return {**res.to_dict(), "dtype_note": dtype_note(res.dtype, res.device), "offload": decision.to_dict(),
            "evaluation": names.describe(), "corpus": corpus.name, "model": str(_model_dir(args))}


def _calib_flags(sp: argparse.ArgumentParser, help_: str) -> None:
    """``--calib`` and the statistics it uses: the text and, as ``calib`` takes them, the token counts."""
    sp.add_argument("--calib", action="store_true", help=help_)
    sp.add_argument("--corpus", help="calibration text file or folder for --calib (default: the Shakespeare split)")
    sp.add_argument("--calib-tokens", type=int, metavar="N",
                    help="fitting tokens of the statistics (default 8192; as `calib --tokens`: the same N finds "
                         "the statistics `calib` captured)")
    sp.add_argument("--calib-heldout-tokens", type=int, metavar="N", help="held-out tokens after them (default 2048)")
    sp.add_argument("--calib-window", type=int, metavar="W", help="tokens per capture window (default min(2048, model max))")


def cmd_calib(args: argparse.Namespace) -> dict:
    from sahc_core.cache import Cache, utcnow
    from sahc_core.calib.stats import CalibConfig
    from sahc_core.calib.store import calibration_stats
    from sahc_core.io.corpus import load_corpus

    cfg = CalibConfig(tokens=args.tokens, heldout_tokens=args.heldout_tokens, window=args.window)
    text = load_corpus(args.corpus).calib_text if args.corpus else None
    update, close = _tqdm_progress("calibration", "layer")
    started = utcnow().isoformat()
    try:
        stats = calibration_stats(_source(args), Cache(args.cache), text, cfg, progress=update, device=args.device)
    finally:
        close()
    meta = stats.meta
    return {"dir": str(stats.path), "tokens": meta["tokens"], "heldout_tokens": meta["heldout_tokens"],
            "window": meta["window"], "seconds": meta["seconds"], "bytes": meta["bytes"],
            "inputs": len({stats.input_of(w) for w in stats.weights()}), "weights": len(stats.weights()),
            "created_at": meta["created_at"], "cached": meta["created_at"] < started, "text_sha256": meta["text_sha256"]}


def cmd_export(args: argparse.Namespace) -> dict:
    from sahc_core.cache import Cache
    from sahc_core.plans.export import export_run

    update, close = _tqdm_progress(f"export {args.format}", "tensor")
    try:
        return export_run(Cache(args.cache), args.run, args.out, args.format, dtype=args.dtype, force=args.force,
                          progress=update, model_dir=args.model)
    finally:
        close()


def cmd_plan(args: argparse.Namespace) -> dict:
    from sahc_core.plans.plan import CompressionPlan, project

    plan = CompressionPlan.from_json(args.plan)
    result = dict(project(plan, _source(args)))
    tensors = result.pop("tensors", None)
    if args.tensors and tensors is not None:
        result["tensors"] = tensors.to_dict(orient="records") if hasattr(tensors, "to_dict") else tensors
    return {"plan": plan.name, **result}


def cmd_run(args: argparse.Namespace) -> dict:
    from sahc_core.cache import Cache
    from sahc_core.evaluate.allocator import retain_freed_memory
    from sahc_core.runs.pipeline import execute_run
    from sahc_core.plans.plan import CompressionPlan

    from sahc_core.paths import safe_id
    from sahc_core.runs.jobs import JobReporter, new_run_id

    run_id = safe_id(args.run_id, "--run-id") if args.run_id is not None else new_run_id()  # before any file
    plan = CompressionPlan.from_json(args.plan)
    cache = Cache(args.cache)
    reporter = JobReporter(cache, run_id, echo=sys.stderr)  # progress lines on stderr, JSON on stdout
    with retain_freed_memory():  # opt-in allocator tuning of the CLI / job process (see evaluate.allocator)
        return execute_run(cache, plan, _model_dir(args), corpus=args.corpus, window=args.window,
                           max_tokens=args.max_tokens, run_id=run_id, reporter=reporter, device=args.device,
                           ppl_threshold=args.ppl_threshold, dtype=args.dtype, offload=args.offload)


def cmd_runs(args: argparse.Namespace) -> dict:
    from sahc_core.cache import Cache
    from sahc_core.runs.jobs import list_runs

    cache = Cache(args.cache)
    if args.delete_files:
        from sahc_core.runs.jobs import delete_run_files

        freed = delete_run_files(cache, args.delete_files)
        print(f"deleted the checkpoint files of run {args.delete_files}: {freed / 1e6:.1f} MB freed; "
              "its results and gate log stay in the cache", file=sys.stderr)
        return {"run_id": args.delete_files, "bytes_freed": freed}
    df = list_runs(cache)
    return {"runs": df.to_dict(orient="records")}


# ----------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="local HF model directory (default: the embedded SmolLM2-135M)")
    common.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    common.add_argument("--cache", help="DuckDB cache file (default: $SAHC_CACHE or cache/sahc.duckdb)")
    common.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto: GPU when present)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    # --no-cache only where it does what it says: run, runs, calib and export live in the cache and do not take it.
    no_cache = argparse.ArgumentParser(add_help=False)
    no_cache.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")

    p = argparse.ArgumentParser(prog="python -m sahc_core", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], dict], help_: str) -> argparse.ArgumentParser:
        parents = [common] if name in ("run", "runs", "calib", "export") else [common, no_cache]
        sp = sub.add_parser(name, parents=parents, help=help_, description=help_)
        sp.set_defaults(func=func)
        return sp

    sp = add("inspect", cmd_inspect, "architecture, components and their parameter shares, tensor list")
    sp.add_argument("--no-prequant", action="store_true",
                    help="skip the pre-quantized grid check (reads a sample of rows of every tensor; cached)")
    sp = add("spectrum", cmd_spectrum, "singular values, statistics and rank-vs-error curve of one tensor")
    sp.add_argument("--tensor", required=True)
    _calib_flags(sp, "also the rank-vs-output-error curve on calibration activations (whitened EYM)")
    sp = add("scan", cmd_scan, "spectrum statistics of every 2-D weight (resumable, cached)")
    sp.add_argument("--component", help="only this component (ffn, attention_full, ...)")
    sp.add_argument("--ray", metavar="auto|local[:N]|ADDRESS",
                    help="one Ray task per tensor on a cluster (needs the ray extra); the cache is written here")
    sp.add_argument("--batch", action=argparse.BooleanOptionalAction, default=None,
                    help="stack same-shape tensors (default: on CUDA only)")
    sp.add_argument("--status", action="store_true",
                    help="only report which tensors are done and the ETA of the rest (from measured times)")

    sp = add("measure", cmd_measure, "compress one tensor and measure bytes, ratio, error, cosine, gates")
    sp.add_argument("--tensor", required=True)
    from sahc_core.cli.method_flags import add_method_flags

    add_method_flags(sp)
    _calib_flags(sp, "use calibration statistics (captured once on the calibration text, then cached): needed "
                     "by gptq/wsvd, and adds output_error on held-out tokens for every method")
    add("methods", cmd_methods, "the registered compression methods and their parameter schemas")

    sp = add("sweep", cmd_sweep, "Tensor-Train rank sweep of an embedding (the study's table)")
    sp.add_argument("--tensor", help="default: the model's embedding (from the component map)")
    sp.add_argument("--ranks", nargs="+", help="rank tuples like 1,32,32,1")
    sp.add_argument("--tt-bits", type=int)
    sp.add_argument("--cos-threshold", type=float, default=0.95)

    for name, func, help_ in (("ppl", cmd_ppl, "perplexity of the model on a corpus (whole test text)"),
                              ("run", cmd_run, "assemble a plan, then perplexity vs baseline (a job)")):
        sp = add(name, func, help_)
        sp.add_argument("--corpus", help="text file or directory of .txt files (default: Shakespeare test split)")
        sp.add_argument("--window", type=int, help="tokens per window (default min(2048, model max))")
        sp.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="evaluation dtype (bfloat16: half the weight memory; native on CPUs with AVX512-BF16/AMX)")
        sp.add_argument("--offload", default="auto", choices=["auto", "never", "always"],
                        help="evaluate one decoder layer at a time (auto: when the model would not fit in memory)")
        if name == "ppl":
            sp.add_argument("--stride", type=int)
            sp.add_argument("--batch-size", type=int, help="windows per forward pass (default 1 on CPU, 8 on GPU)")
        else:
            sp.add_argument("--plan", required=True, help="plan JSON file")
            sp.add_argument("--ppl-threshold", type=float,
                            help="largest relative perplexity increase the ppl_increase gate passes "
                                 "(default 0.10 = +10 %% over the baseline)")
            sp.add_argument("--run-id", help=argparse.SUPPRESS)

    sp = add("calib", cmd_calib, "capture (once) and store calibration statistics XᵀX of every linear input")
    sp.add_argument("--tokens", type=int, default=8192, help="fitting tokens (default 8192)")
    sp.add_argument("--heldout-tokens", type=int, default=2048, help="held-out tokens after them (default 2048)")
    sp.add_argument("--window", type=int, help="tokens per window (default min(2048, model max))")
    sp.add_argument("--corpus", help="text file or directory (its calibration text; default: Shakespeare calib split)")

    sp = add("export", cmd_export, "export a finished run's checkpoint as compressed-tensors, a dense HF model or GGUF")
    sp.add_argument("--run", required=True, metavar="RUN_ID")
    sp.add_argument("--format", required=True, choices=["compressed-tensors", "dense", "gguf"])
    sp.add_argument("--out", required=True, help="output directory (refused when not empty, unless --force)")
    sp.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="dtype of 16-bit/dense tensors (auto: the dtype the run's perplexity was measured in)")
    sp.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    sp = add("plan", cmd_plan, "projected bytes and ratio of a plan file")
    sp.add_argument("--plan", required=True)
    sp.add_argument("--tensors", action="store_true", help="include the per-tensor table")
    sp = add("runs", cmd_runs, "list all runs in the cache (or delete one run's checkpoint files)")
    sp.add_argument("--delete-files", metavar="RUN_ID",
                    help="delete this finished run's assembled checkpoint to free disk; its results stay")
    from sahc_core.cli.optimize import add_optimize_parser
    from sahc_core.cli.report import add_report_parser

    add_report_parser(sub, common, no_cache)
    add_optimize_parser(sub, common)
    return p


def _print_human(result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            import pandas as pd

            print(f"{key}:")
            print(pd.DataFrame(value).to_string(max_rows=60, max_colwidth=60))
        elif isinstance(value, list) and len(value) > 12:
            print(f"{key}: [{len(value)} values] {value[:6]} ...")
        else:
            print(f"{key}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except Exception as exc:  # noqa: BLE001 - the one place where every failure becomes one line
        if args.debug:
            raise
        return _report_error(exc)
    out = jsonable(result, nonfinite="string")
    if args.json:
        print(json.dumps(out, allow_nan=False))
    else:
        _print_human(out)
    return 0


def _report_error(exc: BaseException) -> int:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        msg, code = ("out of memory: try --device cpu, a smaller tensor/component, or a machine with more "
                     "memory (results already stored in the cache are kept)"), EXIT_OOM
    elif isinstance(exc, NumericalError):
        msg, code = str(exc), EXIT_NUMERIC
    elif isinstance(exc, SahcError | ValueError):
        msg, code = str(exc), EXIT_INPUT
    elif isinstance(exc, OSError) and exc.strerror:  # a path the user gave that the system refused
        msg, code = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror, EXIT_INPUT
    else:
        msg, code = f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1
    print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    return code
