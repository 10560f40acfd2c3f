"""The optimizer's candidate measurements on a Ray cluster (``optimize --ray``, ``candidate_table(ray=...)``).

The driver looks the options up in the cache as the serial table does; every tensor with at least
one option missing becomes ONE task (all its missing options). The smoke gate's inputs are captured
once on the driver and ``ray.put`` once (only when a predicted smoke test is missing). Each worker
opens the model from its path itself (shared storage; the fingerprint must equal the driver's,
:func:`~sahc_core.runs.distributed.open_checked`), reopens the calibration statistics from their
folder (``CalibStats(path, split)``, beside the cache: shared storage like the model), measures
exactly what the serial table measures (:func:`~sahc_core.plans.candidates.measure_option`, the
same function) and returns plain values. The driver is the only DuckDB writer: it commits each
tensor's values as they arrive, so an interrupted optimisation resumes with only the rest; the
loop, resources, retries and cancellation are :func:`~sahc_core.runs.distributed.run_tasks`'.

Workers import :mod:`sahc_core.plans.candidates` and what it needs (torch, the methods, the
model reader), never Streamlit.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sahc_core.runs import distributed

if TYPE_CHECKING:
    from sahc_core.plans.candidates import _Measurer
    from sahc_core.plans.smoke_gate import GateInputs


def candidate_task(model_path: str, name: str, fingerprint: str, device: str, *,
                   options: Sequence[tuple[Any, bool, bool]], calib: tuple[str, str] | None,
                   gate_inputs: GateInputs | None) -> list[dict[str, dict]]:
    """One worker's job: the missing values of every ``(config, measure?, gate?)`` of tensor ``name``.

    Returns one :func:`~sahc_core.plans.candidates.measure_option` result per option, in order.
    """
    from sahc_core.calib.stats import CalibStats
    from sahc_core.plans.candidates import measure_option
    from sahc_core.workspace import Workspace

    source = distributed.open_checked(model_path, fingerprint)
    stats = None if calib is None else CalibStats(Path(calib[0]), calib[1])
    ws = Workspace()  # one tensor's weight and SVD, shared by its options

    def gate() -> GateInputs:
        if gate_inputs is None:
            raise distributed.DistributedError(f"the driver sent no smoke-gate inputs for {name}.")
        return gate_inputs

    return [measure_option(source, name, cfg, stats, gate, device, ws, measure=m, gate=g) for cfg, m, g in options]


def measure_on_ray(run: _Measurer, options: Sequence[tuple[str, Sequence[Any]]], address: str,
                   progress: Callable[[int, int, str], None] | None = None,
                   max_retries: int = distributed.MAX_RETRIES) -> None:
    """Measure every option of ``options`` (tensor name -> fitted configs) that ``run`` lacks, on the cluster.

    ``run`` (the table's :class:`~sahc_core.plans.candidates._Measurer`) holds the cached values;
    each tensor's new values are stored in it and committed to the cache as they arrive.
    ``progress(done, total, tensor)``: first the tensors with nothing to measure, then one call per
    finished task. The task is looked up at call time (tests swap it for a dying one).
    """
    distributed._ray()  # a missing extra is named before anything is measured
    todo: dict[str, list[tuple[Any, bool, bool]]] = {}
    for name, cfgs in options:
        need = [(cfg, *run.missing(name, cfg)) for cfg in cfgs]
        if any(m or g for _, m, g in need):
            todo[name] = [n for n in need if n[1] or n[2]]
    done, total = 0, len(options)
    for name, _ in options:
        if name not in todo:
            done += 1
            if progress is not None:
                progress(done, total, name)
    if not todo:
        return
    calib = run.calib
    if calib is not None and not hasattr(calib, "path"):
        raise ValueError("measuring candidates on a Ray cluster reopens the calibration statistics from their folder; "
                         f"give CalibStats (from calib.store.calibration_stats), not {type(calib).__name__}.")
    needs_gate = any(g for need in todo.values() for _, _, g in need)

    def commit(name: str, values: list[dict[str, dict]], _running: distributed.Running) -> None:
        nonlocal done
        for (cfg, _, _), new in zip(todo[name], values, strict=True):
            run.store(name, cfg, new)
        run.flush()  # the driver is the only writer: one transaction per tensor, at once (resumable)
        done += 1
        if progress is not None:
            progress(done, total, name)

    src = run.source
    jobs = [(name, (str(src.path), name, src.fingerprint), {"options": need}) for name, need in todo.items()]
    shared = {"gate_inputs": run.gate_inputs() if needs_gate else None,
              "calib": None if calib is None else (str(calib.path), str(calib.split))}
    distributed.run_tasks(address, candidate_task, jobs, commit, what="the candidate measurements of",
                          device=run.device, shared=shared, max_retries=max_retries)
