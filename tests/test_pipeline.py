"""The whole run on the tiny llama: assemble, gates, perplexity vs a cached baseline, cancel, failure."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from sahc_core.cache import Cache
from sahc_core.errors import CorpusError
from sahc_core.gates import audit_log
from sahc_core.runs.jobs import JobCancelled, JobReporter, list_runs, run_status, start_run
from sahc_core.runs.pipeline import BASELINE_KIND, execute_run
from tiny_models import TINY_TEXT

WINDOW = 32
TEXT = TINY_TEXT
INT4 = {"name": "int4-g32", "default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "asym"},
        "overrides": [{"pattern": "*norm*", "method": "keep"}]}
KEEP = {"name": "keep-bf16", "default": {"method": "keep"}}


@pytest.fixture(scope="module")
def model_dir(tiny_llama_tok_dir: Path) -> Path:
    """The tiny llama plus a word-level tokenizer (vocab <= 256) trained in memory on TEXT."""
    return tiny_llama_tok_dir


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "test.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def _reference_ppl(model_dir: Path, state_dict: dict | None) -> float:
    """Independent perplexity: HF's own shifted cross-entropy per non-overlapping window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)
    ids = torch.tensor(tok(TEXT)["input_ids"])
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(ids), WINDOW):
            x = ids[b:b + WINDOW].unsqueeze(0)
            if x.shape[1] < 2:
                continue
            loss = model(input_ids=x, labels=x).loss.item()  # mean over x.shape[1] - 1 predictions
            nll += loss * (x.shape[1] - 1)
            n += x.shape[1] - 1
    return math.exp(nll / n)


def test_run_int4_end_to_end_with_cached_baseline(tmp_path: Path, model_dir: Path, corpus_file: Path) -> None:
    from sahc_core.plans.assemble import load_assembled

    cache = Cache(tmp_path / "c.duckdb")
    res = execute_run(cache, INT4, model_dir, corpus=corpus_file, window=WINDOW, run_id="run-a", device="cpu")
    # bytes: projected from the formula, actual from the files (safetensors headers are the only gap)
    assert res["bytes_projected"] == res["bytes_payload"]
    assert res["bytes_projected"] < res["bytes_actual"] < res["bytes_projected"] * 1.2
    assert res["ratio_actual"] == pytest.approx(res["bytes_original"] / res["bytes_actual"])
    assert 2.0 < res["ratio_actual"] < res["ratio_projected"]
    # perplexity: both numbers against an independent computation
    assert res["baseline_ppl"] == pytest.approx(_reference_ppl(model_dir, None), rel=1e-5)
    state = load_assembled(res["out_dir"])
    assert res["ppl"] == pytest.approx(_reference_ppl(model_dir, state), rel=1e-5)
    assert res["delta_ppl"] == pytest.approx(res["ppl"] - res["baseline_ppl"])
    assert res["protocol"]["window"] == WINDOW and res["protocol"]["stride"] == WINDOW
    assert res["protocol"]["tokens"] > 100 and res["protocol"]["device"] == "cpu"
    # gates: every decision in the result and in the audit log, model-level ones passed
    names = {g["gate"] for g in res["gates"]}
    assert {"rel_error", "theory_vs_actual", "shape_match", "plan_coverage", "ppl_increase"} <= names
    assert not names & {"quant_error", "ppl_finite"}
    assert res["gates_passed"] + res["gates_failed"] == len(res["gates"])
    log = audit_log(cache, run_id="run-a")
    assert len(log) == len(res["gates"]) and int((~log["passed"]).sum()) == res["gates_failed"]
    by_gate = {g["gate"]: g for g in res["gates"] if g["tensor"] == "*"}
    assert by_gate["shape_match"]["passed"] and by_gate["plan_coverage"]["passed"]
    # the perplexity gate: relative increase against the default +10 %, both perplexities and the protocol
    pg = by_gate["ppl_increase"]
    assert pg["value"] == pytest.approx((res["ppl"] - res["baseline_ppl"]) / res["baseline_ppl"])
    assert pg["threshold"] == res["ppl_threshold"] == 0.10 and pg["passed"] == (pg["value"] <= 0.10)
    assert pg["evidence"]["ppl"] == res["ppl"] and pg["evidence"]["baseline_ppl"] == res["baseline_ppl"]
    assert pg["evidence"]["tokens"] == res["protocol"]["tokens"] and pg["evidence"]["window"] == WINDOW
    assert res["ppl_increase"] == pytest.approx(pg["value"])
    # every int tensor is predicted by the rounding-noise model (none of them is a weak-only check)
    theory = [g for g in res["gates"] if g["gate"] == "theory_vs_actual"]
    int_tensors = {g["tensor"] for g in res["gates"] if g["gate"] == "rel_error" and g["evidence"]["method"] == "int"}
    assert int_tensors and {g["tensor"] for g in theory} == int_tensors  # keep (norms): no prediction, no gate
    assert all(g["evidence"]["basis"].startswith("uniform rounding noise") for g in theory)
    summary = {r["gate"]: r for r in res["gate_summary"]}
    assert summary["rel_error"]["weak"] and summary["rel_error"]["n"] == len([g for g in res["gates"]
                                                                              if g["gate"] == "rel_error"])
    assert sum(r["n"] for r in res["gate_summary"]) == len(res["gates"])
    assert {c["component"] for c in res["components"]} >= {"ffn", "embedding"}
    # stored: the runs row and the listing
    st = run_status(cache, "run-a")
    assert st["status"] == "done" and st["result"]["ppl"] == res["ppl"] and st["model_fp"] == res["model_fp"]
    row = list_runs(cache).iloc[0]
    assert row["plan_name"] == "int4-g32" and row["ppl"] == res["ppl"] and row["gates_failed"] == res["gates_failed"]
    # second run: the baseline comes from the cache, the same number, and a bf16 keep plan is near it
    assert len(cache.keys(BASELINE_KIND, res["model_fp"], 1)) == 1
    res2 = execute_run(cache, KEEP, model_dir, corpus=corpus_file, window=WINDOW, run_id="run-b", device="cpu",
                       ppl_threshold=0.0)
    assert res2["baseline_cached"] and res2["baseline_ppl"] == res["baseline_ppl"]
    pg2 = next(g for g in res2["gates"] if g["gate"] == "ppl_increase")  # a configurable threshold
    assert pg2["threshold"] == res2["ppl_threshold"] == 0.0 and pg2["passed"] is (res2["ppl"] <= res2["baseline_ppl"])
    assert abs(res2["delta_ppl"]) < 0.02 * res["baseline_ppl"]
    assert res2["ratio_projected"] == pytest.approx(1.0)
    assert len(list_runs(cache)) == 2


def test_cancelled_run_is_marked_and_leaves_no_checkpoint(tmp_path: Path, model_dir: Path, corpus_file: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    cache.execute("INSERT INTO runs (run_id, status, cancel_requested) VALUES ('c1', 'queued', true)")
    with pytest.raises(JobCancelled):
        execute_run(cache, INT4, model_dir, corpus=corpus_file, window=WINDOW, reporter=JobReporter(cache, "c1"))
    assert run_status(cache, "c1")["status"] == "cancelled"
    assert not (tmp_path / "runs" / "c1").exists()


def test_cancel_during_assembly(tmp_path: Path, model_dir: Path, corpus_file: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")

    class CancelAfterTwo(JobReporter):
        def progress(self, force: bool = False, **fields) -> None:
            super().progress(force=force, **fields)
            if fields.get("tensors_done") == 2:
                self.cache.execute("UPDATE runs SET cancel_requested = true WHERE run_id = ?", [self.run_id])
                self._last_cancel_check = 0.0

    with pytest.raises(JobCancelled):
        execute_run(cache, INT4, model_dir, corpus=corpus_file, window=WINDOW, reporter=CancelAfterTwo(cache, "c2"))
    st = run_status(cache, "c2")
    assert st["status"] == "cancelled" and st["stage"] == "assemble"
    assert not any((tmp_path / "runs").glob("c2*"))


def test_bad_ppl_threshold_is_refused_before_any_work(tmp_path: Path, model_dir: Path, corpus_file: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(ValueError, match="threshold"):
        execute_run(cache, INT4, model_dir, corpus=corpus_file, window=WINDOW, run_id="t1", ppl_threshold=-1.0)
    assert cache.execute("SELECT count(*) FROM runs")[0][0] == 0 and not (tmp_path / "runs").exists()


def test_non_finite_compressed_perplexity_fails_the_run(tmp_path: Path, model_dir: Path, corpus_file: Path,
                                                         monkeypatch) -> None:
    """The compressed model's log-probabilities turn NaN: the gate is logged failed, the run is failed."""
    from sahc_core.errors import NumericalError
    from sahc_core.evaluate.model import load_state

    def nan_state(model, state, names=None):  # stands in for weights whose outputs overflow
        load_state(model, {k: (state[k] * math.nan if k.endswith("down_proj.weight") else state[k]) for k in state},
                   names)

    import sahc_core.evaluate.model as evaluate

    monkeypatch.setattr(evaluate, "load_state", nan_state)
    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(NumericalError, match="no finite perplexity") as exc:
        execute_run(cache, INT4, model_dir, corpus=corpus_file, window=WINDOW, run_id="nan1", device="cpu")
    assert "window 1 of" in str(exc.value)
    st = run_status(cache, "nan1")
    assert st["status"] == "failed" and st["result"] is None
    assert "no finite perplexity" in st["error"] and "\n" not in st["error"]
    log = audit_log(cache, run_id="nan1")
    pg = log[log["gate"] == "ppl_increase"].iloc[0]
    assert not pg["passed"] and math.isnan(pg["value"]) and "NaN" in pg["evidence"]


def test_non_finite_baseline_fails_the_run_and_is_not_cached(tmp_path: Path, model_dir: Path,
                                                              corpus_file: Path) -> None:
    """A model whose logits overflow (final norm x 1e5): exp(mean NLL) overflows, the run says why."""
    from safetensors.torch import load_file, save_file

    from sahc_core.errors import NumericalError

    d = tmp_path / "big"
    shutil.copytree(model_dir, d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / idx["weight_map"]["model.norm.weight"]
    t = load_file(str(shard))
    t["model.norm.weight"] = t["model.norm.weight"] * 1e5
    save_file(t, str(shard), metadata={"format": "pt"})
    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(NumericalError, match="baseline.*no finite perplexity.*overflows float64"):
        execute_run(cache, KEEP, d, corpus=corpus_file, window=WINDOW, run_id="big1", device="cpu")
    st = run_status(cache, "big1")
    assert st["status"] == "failed" and "overflows float64" in st["error"]
    assert cache.keys(BASELINE_KIND, st["model_fp"], 1) == []


def test_failed_run_records_the_error(tmp_path: Path, model_dir: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(CorpusError):
        execute_run(cache, INT4, model_dir, corpus=tmp_path / "missing.txt", run_id="f1")
    st = run_status(cache, "f1")
    assert st["status"] == "failed" and "missing.txt" in st["error"] and "\n" not in st["error"]


@pytest.mark.slow
def test_start_run_background_worker_to_done(tmp_path: Path, model_dir: Path, corpus_file: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    run_id = start_run(cache, KEEP, model_dir, corpus=corpus_file, window=WINDOW, device="cpu")
    st = run_status(cache, run_id)
    assert st["status"] in ("queued", "running") and st["pid"] and st["log_path"].endswith(f"{run_id}.log")
    end = time.monotonic() + 240
    while time.monotonic() < end and run_status(cache, run_id)["status"] in ("queued", "running"):
        time.sleep(0.5)
    st = run_status(cache, run_id)
    assert st["status"] == "done", (st["error"], Path(st["log_path"]).read_text()[-2000:])
    assert st["result"]["ppl"] == pytest.approx(st["result"]["baseline_ppl"], rel=0.02)
    assert Path(st["result"]["out_dir"]).is_dir()


def test_a_run_loads_the_model_once(tmp_path: Path, model_dir: Path, corpus_file: Path, monkeypatch) -> None:
    """Smoke test, baseline and compressed perplexity share ONE loaded model (the assembled weights are
    loaded into it last), so a run never holds two copies of a large model."""
    import sahc_core.evaluate.model as evaluate

    calls = []
    real = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: calls.append(k.get("state_dict")) or real(*a, **k))
    cache = Cache(tmp_path / "c.duckdb")
    res = execute_run(cache, INT4, model_dir, corpus=corpus_file, window=WINDOW, run_id="once", device="cpu")
    assert calls == [None]
    assert not res["baseline_cached"] and res["ppl"] != res["baseline_ppl"]


def test_measure_checkpoint_streams_each_tensor_once(tmp_path: Path, model_dir: Path, monkeypatch) -> None:
    """The gates stage rebuilds each stored tensor once, measures it and drops it: it returns the
    rebuilt shapes (tied head included), never the weights."""
    from sahc_core.methods import quant
    from sahc_core.plans.assemble import assemble, load_assembled
    from sahc_core.io.source import ModelSource
    from sahc_core.runs.pipeline import _as_plan, measure_checkpoint

    source = ModelSource.open(model_dir)
    out = tmp_path / "o"
    assemble(source, _as_plan(INT4), out)
    expected = load_assembled(out)
    calls = []
    real = quant.QuantizedTensor.reconstruct
    monkeypatch.setattr(quant.QuantizedTensor, "reconstruct", lambda self, *a: calls.append(1) or real(self, *a))
    gates, rows, shapes = measure_checkpoint(source, out)
    assert shapes == {n: tuple(t.shape) for n, t in expected.items()}
    n_int = sum(r["method"] == "int" for r in rows)
    assert n_int > 0 and len(calls) == n_int
    assert len(rows) == len({r["name"] for r in rows}) and {g.tensor for g in gates} <= set(shapes)
