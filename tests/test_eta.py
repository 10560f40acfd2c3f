"""Run-time estimates (sahc_core.runs.eta): rates from past runs, the pre-launch estimate, the live ETA."""
from __future__ import annotations

import pytest

from sahc_core.cache import Cache, to_json, utcnow
from sahc_core.runs import eta
from sahc_core.runs.jobs import JobReporter, run_status


def _done(cache: Cache, rid: str, fp: str | None, params: int, tokens: int, secs: dict, cached: bool = True,
          sha: str = "s" * 64, max_tokens=None, device: str = "cpu") -> None:
    res = {"protocol": {"text_sha256": sha, "tokens": tokens, "window": 2048, "max_tokens": max_tokens,
                        "device": device}, "seconds": secs, "baseline_cached": cached,
           "work": {"params": params, "tokens": tokens}}
    cache.execute("INSERT INTO runs (run_id, model_fp, status, result, started_at, finished_at) "
                  "VALUES (?, ?, 'done', ?, ?, ?)", [rid, fp, to_json(res), utcnow(), utcnow()])


def test_run_rates_per_stage_unit():
    r = {"seconds": {"assemble": 2.0, "gates": 4.0, "baseline": 10.0, "ppl": 20.0}, "baseline_cached": False,
         "work": {"params": 1000, "tokens": 50}}
    assert eta.run_rates(r) == {"assemble": 500.0, "gates": 250.0, "baseline": 5000.0, "ppl": 2500.0}
    legacy = {"seconds": {"ppl": 10.0}, "bytes_original": 4000, "protocol": {"tokens": 5}, "baseline_cached": True}
    assert eta.run_rates(legacy) == {"ppl": 2000 * 5 / 10.0}  # params = 16-bit bytes / 2; cached baseline: no rate


def test_stage_rates_prefer_this_model_and_fall_back_to_the_prior(tmp_path):
    cache = Cache(tmp_path / "c.duckdb")
    rates, basis = eta.stage_rates(cache, "fp")
    assert rates == eta.PRIOR_RATES and "no run has finished" in basis
    _done(cache, "a", "other", 100, 10, {"assemble": 1.0, "ppl": 1.0})
    _done(cache, "b", "fp", 100, 10, {"assemble": 2.0, "ppl": 4.0})
    _done(cache, "c", "fp", 100, 10, {"assemble": 4.0, "ppl": 5.0})
    _done(cache, "g", "fp", 100, 10, {"assemble": 0.01, "ppl": 0.01}, device="cuda")  # other device: ignored
    rates, basis = eta.stage_rates(cache, "fp")
    assert rates["assemble"] == pytest.approx((50 + 25) / 2) and rates["ppl"] == pytest.approx((250 + 200) / 2)
    assert rates["gates"] == eta.PRIOR_RATES["gates"] and "2 past run(s) of this model" in basis
    assert eta.stage_rates(cache, "new-model")[1].endswith("of other models on this machine")


def test_token_estimate_exact_for_a_known_protocol(tmp_path):
    cache = Cache(tmp_path / "c.duckdb")
    assert eta.estimate_tokens(cache, "s" * 64, 1000, None, None) == (int(1000 * eta.TOKENS_PER_CHAR), False)
    _done(cache, "a", "fp", 1, 300, {}, max_tokens=None)
    assert eta.estimate_tokens(cache, "s" * 64, 1000, None, None) == (300, True)
    assert eta.estimate_tokens(cache, "s" * 64, 2000, 512, 100) == (100, False)  # ratio 0.3, capped


def test_overall_eta_and_fraction_by_hand():
    exp = {"params": 1_000_000, "tokens": 1000, "baseline_cached": False,
           "rates": {"assemble": 1e5, "gates": 2e5, "baseline": 1e8, "ppl": 1e8}}  # 10 + 5 + 10 + 10 s
    p = {"stage": "gates", "expected": exp, "stage_seconds": {"project": 0.5, "assemble": 12.0},
         "stage_elapsed_s": 2.0, "fraction": 0.5, "eta_s": 2.0}
    frac, left = eta.overall(p)
    assert left == pytest.approx(2.0 + 10 + 10) and frac == pytest.approx(14.5 / (14.5 + 22.0))
    # the perplexity stages know the real token count: 4000 tokens take 4x the expected 10 s
    frac, left = eta.overall({**p, "stage": "baseline", "tokens_total": 4000, "fraction": 0.0, "eta_s": None})
    assert left == pytest.approx(40.0 + 40.0)
    assert eta.overall({"stage": "done", "expected": exp}) == (1.0, 0.0)
    assert eta.overall({"stage": "calibration", "expected": exp, "stage_elapsed_s": 5.0})[1] == pytest.approx(35.0)
    assert eta.overall({"stage": "assemble"}) == (None, None)  # a run that recorded no expectation


def test_reporter_keeps_the_expectation_and_times_each_stage(tmp_path):
    import time

    cache = Cache(tmp_path / "c.duckdb")
    rep = JobReporter(cache, "r")
    rep.start(plan={"name": "p"})
    rep.stage("assemble")
    rep.expect(expected={"params": 1, "tokens": 1, "baseline_cached": True, "rates": eta.PRIOR_RATES})
    time.sleep(0.05)
    rep.stage("gates")
    prog = run_status(cache, "r")["progress"]
    assert prog["stage"] == "gates" and prog["expected"]["params"] == 1  # kept across stages
    assert set(prog["stage_seconds"]) == {"assemble"} and prog["stage_seconds"]["assemble"] >= 0.05


def test_prelaunch_estimate_on_a_model(tmp_path, tiny_llama_dir):
    from sahc_core.io.source import ModelSource

    cache = Cache(tmp_path / "c.duckdb")
    src = ModelSource.open(tiny_llama_dir)
    est = eta.prelaunch_estimate(cache, src, max_tokens=4096, device="cpu")
    P, T = src.num_params, 4096
    r = eta.PRIOR_RATES
    assert est["tokens"] == T and not est["tokens_exact"] and not est["baseline_cached"]
    assert est["seconds"] == pytest.approx(P / r["assemble"] + P / r["gates"] + 2 * P * T / r["ppl"])
    text = eta.estimate_sentence(est)
    assert "4,096 scored tokens" not in text and "≈ 4,000 scored tokens on this machine" in text
    assert "use Max tokens for a quick look" in text
