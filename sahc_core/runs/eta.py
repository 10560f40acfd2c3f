"""How long a run will take: per-stage rates measured from past runs, a pre-launch estimate, a live ETA.

Work units per stage (what the stage's time grows with):

* ``assemble`` and ``gates``: the model's parameters ``P`` (every tensor is compressed, then rebuilt
  and measured once);
* ``baseline`` and ``ppl``: parameter-tokens ``P · T`` (a forward pass costs about ``2 P`` FLOPs per
  token, Kaplan et al. 2020), so a rate measured on one model carries over to another size; the
  baseline costs nothing when it is already cached for the protocol.

A rate is units per second, the median over the latest finished runs on the same device type (the
same model first, else any model). With no finished run yet, :data:`PRIOR_RATES` (measured on the
default model on 2 CPU cores, see README) stand in, and the estimate says so. The live ETA of a
running run (:func:`overall`) adds the current stage's remaining time (its own measured rate) to the
expected time of the stages still to come.

References
----------
.. [1] J. Kaplan et al., "Scaling Laws for Neural Language Models", arXiv:2001.08361, 2020 (C ≈ 2 N per token).
"""
from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping
from typing import Any

#: Stages whose time is estimated, in run order (``project`` takes well under a second).
STAGES = ("assemble", "gates", "baseline", "ppl")
#: Units/s without a past run: params/s (assemble, gates), parameter-tokens/s (baseline, ppl); SmolLM2-135M on
#: 2 CPU cores: int4 assembly 1-9 s, gates 6-15 s, 702 tokens/s (README, "Runs on the default model").
PRIOR_RATES = {"assemble": 3e7, "gates": 1e7, "baseline": 9e10, "ppl": 9e10}
#: Tokens per character of English text under a BPE tokenizer when no run measured it (0.317 on the
#: embedded Shakespeare split with SmolLM2's tokenizer).
TOKENS_PER_CHAR = 0.32
#: Finished runs the rates are taken from (the newest).
MAX_RUNS = 10


def _device_type(device: str | None) -> str:
    return (device or "cpu").split(":")[0]


def _past_results(cache, limit: int = 200) -> list[tuple[str | None, dict]]:
    rows = cache.execute("SELECT model_fp, result FROM runs WHERE status = 'done' AND result IS NOT NULL "
                         "ORDER BY finished_at DESC NULLS LAST LIMIT ?", [limit])
    out = []
    for fp, res in rows:
        try:
            out.append((fp, json.loads(res) if isinstance(res, str) else dict(res)))
        except (TypeError, ValueError):
            continue
    return out


def run_rates(result: Mapping) -> dict[str, float]:
    """Units per second of each stage of one finished run (stages without a usable time are left out).

    ``P`` is the result's ``work.params``, else ``bytes_original / 2`` (16-bit originals); ``T`` its
    protocol's scored tokens. A cached baseline gives no baseline rate.
    """
    secs = result.get("seconds") or {}
    work = result.get("work") or {}
    params = work.get("params") or ((result.get("bytes_original") or 0) / 2)
    tokens = work.get("tokens") or (result.get("protocol") or {}).get("tokens")
    units = {"assemble": params, "gates": params, "ppl": params * (tokens or 0),
             "baseline": 0 if result.get("baseline_cached") else params * (tokens or 0)}
    return {s: units[s] / secs[s] for s in STAGES if units[s] and (secs.get(s) or 0) > 0}


def stage_rates(cache, model_fp: str | None = None, device: str = "cpu") -> tuple[dict[str, float], str]:
    """Median rate per stage over the newest finished runs, and one phrase saying where it came from.

    Runs of ``model_fp`` are preferred; other models count when this one has none. Missing stages
    take :data:`PRIOR_RATES`.
    """
    dev = _device_type(device)
    past = [(fp, r) for fp, r in _past_results(cache)
            if _device_type((r.get("protocol") or {}).get("device")) == dev]
    timed = [(fp, rates) for fp, rates in ((fp, run_rates(r)) for fp, r in past) if rates]  # runs with timings
    same = [rates for fp, rates in timed if model_fp is not None and fp == model_fp][:MAX_RUNS]
    pool, whose = (same, "this model") if same else ([rates for _, rates in timed][:MAX_RUNS], "other models")
    measured: dict[str, list[float]] = {s: [] for s in STAGES}
    for rates in pool:
        for s, v in rates.items():
            measured[s].append(v)
    rates = {s: statistics.median(v) if v else PRIOR_RATES[s] for s, v in measured.items()}
    if not pool:
        basis = ("no run has finished on this machine yet, so this is a rough figure from 2 CPU cores"
                 + ("; a GPU is usually much faster" if dev == "cuda" else ""))
    else:
        basis = f"measured on {len(pool)} past run(s) of {whose} on this machine"
    return rates, basis


def stage_seconds(params: int, tokens: int, rates: Mapping[str, float], baseline_cached: bool) -> dict[str, float]:
    """Expected seconds per stage for ``params`` parameters and ``tokens`` scored tokens."""
    work = {"assemble": params, "gates": params, "baseline": 0 if baseline_cached else params * tokens,
            "ppl": params * tokens}
    return {s: work[s] / rates[s] for s in STAGES}


def estimate_tokens(cache, corpus_fp: str, n_chars: int, window: int | None, max_tokens: int | None) -> tuple[int, bool]:
    """Scored tokens of a protocol: exact from a past run of the same one, else characters × tokens/char.

    Returns ``(tokens, exact)``.
    """
    ratios = []
    for _, r in _past_results(cache):
        p = r.get("protocol") or {}
        if p.get("text_sha256") != corpus_fp or not p.get("tokens"):
            continue
        if p.get("max_tokens") == max_tokens and (window is None or p.get("window") == window):
            return int(p["tokens"]), True
        if p.get("max_tokens") is None:
            ratios.append(p["tokens"] / max(1, n_chars))
    est = int(n_chars * (statistics.median(ratios) if ratios else TOKENS_PER_CHAR))
    return (min(est, max_tokens) if max_tokens else est), False


def machine_load() -> float | None:
    """1-minute load average per CPU core (None where the OS does not say)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return None


def prelaunch_estimate(cache, source, corpus: Any = None, window: int | None = None, max_tokens: int | None = None,
                       device: str = "auto") -> dict:
    """What a run of ``source`` under this protocol will cost, before it is launched.

    Returns
    -------
    dict
        ``seconds`` (total), ``stages`` (seconds per stage), ``tokens``, ``tokens_exact``,
        ``baseline_cached``, ``basis`` (where the rates came from), ``load`` (per core, or None).
    """
    from sahc_core.device import resolve_device
    from sahc_core.evaluate.perplexity import PplConfig
    from sahc_core.runs.pipeline import BASELINE_KIND, PPL_VERSION, _as_corpus, baseline_key
    from sahc_core.runs.protocol import text_fingerprint

    dev = resolve_device(device)
    corpus = _as_corpus(corpus)
    cfg = PplConfig(window=window, max_tokens=max_tokens, device=device)
    cached = cache.get(BASELINE_KIND, source.fingerprint, baseline_key(corpus, cfg, dev), PPL_VERSION) is not None
    tokens, exact = estimate_tokens(cache, text_fingerprint(corpus.test_text), len(corpus.test_text), window,
                                    max_tokens)
    rates, basis = stage_rates(cache, source.fingerprint, dev)
    stages = stage_seconds(source.num_params, tokens, rates, cached)
    return {"seconds": sum(stages.values()), "stages": stages, "tokens": tokens, "tokens_exact": exact,
            "baseline_cached": cached, "basis": basis, "load": machine_load()}


def estimate_sentence(est: Mapping) -> str:
    """E.g. "≈ 4 min 10 s for ≈ 64,000 scored tokens on this machine (measured on ...); use Max tokens ..."."""
    from sahc_core.figures.format import fmt_duration

    tok = f"{est['tokens']:,}" if est["tokens_exact"] else f"≈ {round(est['tokens'], -3):,.0f}"
    text = (f"≈ {fmt_duration(est['seconds'])} for {tok} scored tokens on this machine ({est['basis']}"
            + ("; the baseline is cached" if est["baseline_cached"] else "") + "); use Max tokens for a quick look.")
    if est.get("load") is not None and est["load"] > 1.0:
        text += f" The machine is busy (load {est['load']:.1f} per core): expect longer."
    return text


def expectation(cache, source, corpus, cfg, device: str) -> dict:
    """What a starting run writes into its progress (``expected``) for :func:`overall` to read."""
    from sahc_core.runs.pipeline import BASELINE_KIND, PPL_VERSION, baseline_key
    from sahc_core.runs.protocol import text_fingerprint

    cached = cache.get(BASELINE_KIND, source.fingerprint, baseline_key(corpus, cfg, device), PPL_VERSION) is not None
    tokens, _ = estimate_tokens(cache, text_fingerprint(corpus.test_text), len(corpus.test_text), cfg.window,
                                cfg.max_tokens)
    rates, basis = stage_rates(cache, source.fingerprint, device)
    return {"params": int(source.num_params), "tokens": tokens, "baseline_cached": cached, "rates": rates,
            "basis": basis}


def overall(progress: Mapping | None) -> tuple[float | None, float | None]:
    """``(fraction, eta_s)`` of the whole run from its progress dict (None, None when unknown).

    Finished stages count with their measured ``stage_seconds``; the current stage with its live
    ``eta_s`` (else its expected time × the fraction left); later stages with their expected time,
    using the real token count once the perplexity stages know it (``tokens_total``). During a stage
    before them (``project``, ``calibration``) the ETA is the four estimated stages, without the rest
    of that stage.
    """
    p = progress or {}
    exp = p.get("expected")
    stage = p.get("stage")
    if not exp or not stage:
        return None, None
    if stage == "done":
        return 1.0, 0.0
    tokens = p.get("tokens_total") or exp["tokens"]
    expected = stage_seconds(exp["params"], tokens, exp["rates"], exp["baseline_cached"])
    spent = sum(float(v) for v in (p.get("stage_seconds") or {}).values()) + float(p.get("stage_elapsed_s") or 0.0)
    if stage not in STAGES:  # "project", "calibration": before the estimated stages (their own time not counted)
        left = sum(expected.values())
    else:
        i = STAGES.index(stage)
        frac = float(p.get("fraction") or 0.0)
        cur = p.get("eta_s")
        cur = float(cur) if cur is not None and p.get("fraction") else expected[stage] * (1.0 - frac)
        left = cur + sum(expected[s] for s in STAGES[i + 1:])
    total = spent + left
    return (spent / total if total > 0 else 0.0), left
