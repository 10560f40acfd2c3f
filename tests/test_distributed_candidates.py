"""The optimizer's candidate table on a local Ray cluster: equal to the serial table, resumable, no row lost or doubled."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from sahc_core.cache import Cache
from sahc_core.calib.stats import CalibConfig
from sahc_core.calib.store import calibration_stats
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.plans import _ray_candidates
from sahc_core.plans.candidates import GATE_KIND, CandidateGrid, GateSource, _gate_key, candidate_table
from sahc_core.plans.smoke_gate import model_loader, text_key
from sahc_core.runs.distributed import DistributedError
from sahc_core.whatif import measure as whatif
from tiny_models import TINY_TEXT

ray = pytest.importorskip("ray")
import test_distributed  # noqa: E402 - after the skip: it needs Ray

cluster = test_distributed.cluster  # the module's local 2-CPU cluster (the same fixture, one per module)

TEXT = TINY_TEXT * 3  # 702 word tokens
N_SMOKE = 128
GRID = CandidateGrid(methods=("int",), bits=(2, 4), group_sizes=(32, None))
CAL_GRID = CandidateGrid(methods=("int", "gptq"), bits=(4,), calibrated_bits=(3,), group_sizes=(None,))
_IDENTITY = ["tensor", "component", "method", "config", "label", "kind", "layer", "ndim", "bits", "group_size", "bytes",
             "orig_bytes", "feasible", "failed_gates"]


@pytest.fixture(scope="module")
def qwen_tok_dir(tiny_qwen35_dir, tmp_path_factory):
    """The tiny Qwen3.5 plus a word-level tokenizer (the smoke gate tokenizes the text)."""
    from tiny_models import with_word_tokenizer

    return with_word_tokenizer(tiny_qwen35_dir, tmp_path_factory.mktemp("qwen_tok") / "m")


@pytest.fixture(scope="module")
def models(qwen_tok_dir, tiny_llama_tok_dir):
    """Name -> (source, gate): one memoised model load per model for the whole module."""
    out = {}
    for key, path in (("qwen3_5", qwen_tok_dir), ("llama", tiny_llama_tok_dir)):
        out[key] = (ModelSource.open(path), GateSource(load=model_loader(path, "cpu"), text=TEXT, n_tokens=N_SMOKE))
    return out


@pytest.fixture(scope="module")
def serial(models):
    """The serial table of each model on :data:`GRID` (no cache), computed once."""
    return {k: candidate_table(src, gate, None, None, GRID, device="cpu") for k, (src, gate) in models.items()}


@pytest.fixture(scope="module")
def calibrated(models, tmp_path_factory):
    """The tiny llama's calibration statistics (in their folder beside a cache) and its serial table on CAL_GRID."""
    source, gate = models["llama"]
    cache = Cache(tmp_path_factory.mktemp("calib") / "c.duckdb")
    model, tok = gate.load()
    calib = calibration_stats(source, cache, TEXT, CalibConfig(tokens=256, heldout_tokens=128), model=model,
                              tokenizer=tok)
    return calib, candidate_table(source, gate, None, calib, CAL_GRID, device="cpu")


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal candidate tables: identity columns exactly, measured numbers to rtol 1e-6.

    Same code (``candidates.measure_option``) on the same data. With one BLAS thread in the driver
    (``OMP_NUM_THREADS=1``, as this suite runs) and in each Ray task (one CPU each) the tables come
    out bit-equal (checked on int, hqq, svd and gptq options); run with a multi-threaded driver, the
    serial table's float32 reductions (GPTQ's Cholesky, the cosine sums) may be taken in another
    order and move in the last float32 digits (~1e-7 relative), hence rtol 1e-6 rather than bit
    equality. Bytes, configs, labels and gate decisions must match exactly.
    """
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in _IDENTITY:
        assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), col
    for col in ("rel_error", "output_error", "lookup_output_error", "output_cosine", "damage"):
        np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-6, atol=0, err_msg=col)


def _stored(cache: Cache, fp: str, kind: str) -> list[str]:
    return [k for (k,) in cache.execute("SELECT key FROM results WHERE kind = ? AND model_fp = ?", [kind, fp])]


def _one_row_each(cache: Cache, source: ModelSource, df: pd.DataFrame, calib=None) -> None:
    """Every measured (tensor, config) of ``df`` has exactly one measurement row and one gate row, and nothing else."""
    opts = df[df["ndim"] >= 2]
    cfgs = [(t, registry.config_from_dict(json.loads(c))) for t, c in zip(opts["tensor"], opts["config"])]
    tkey = text_key(TEXT, N_SMOKE)
    for kind, want in ((whatif.KIND_MEASURE, [whatif.measure_key(t, c, calib) for t, c in cfgs]),
                       (GATE_KIND, [_gate_key(t, c, tkey, calib) for t, c in cfgs])):
        rows = _stored(cache, source.fingerprint, kind)
        assert len(rows) == len(set(rows)) == len(want) and set(rows) == set(want), kind


@pytest.mark.parametrize("model", ["qwen3_5", "llama"])
def test_ray_candidates_equal_the_serial_table_and_store_each_option_once(cluster, models, serial, model, tmp_path,
                                                                        monkeypatch):
    source, gate = models[model]
    cache = Cache(tmp_path / "c.duckdb")
    seen = []
    df = candidate_table(source, gate, cache, None, GRID, device="cpu", ray="local",
                         progress=lambda d, t, n: seen.append((d, t, n)))
    _same(df, serial[model])
    _one_row_each(cache, source, df)
    n = df["tensor"].nunique()
    assert [s[0] for s in seen] == list(range(1, n + 1)) and {s[1] for s in seen} == {n}
    assert sorted(s[2] for s in seen) == sorted(set(df["tensor"]))

    def boom(*_a, **_k):
        raise AssertionError("a cached option was sent to the cluster")

    monkeypatch.setattr(_ray_candidates, "candidate_task", boom)
    again = candidate_table(source, gate, cache, None, GRID, device="cpu", ray="local")  # lookups only
    assert again.equals(df)
    assert ray.is_initialized()  # the test's session is joined and left running


def test_ray_candidates_with_calibration_statistics_equal_the_serial_table(cluster, models, calibrated, tmp_path):
    """gptq needs the fitting statistics, every option the held-out ones: the workers reopen them from their folder."""
    source, gate = models["llama"]
    calib, serial_cal = calibrated
    assert (serial_cal["method"] == "gptq").any() and serial_cal["output_error"].notna().any()
    cache = Cache(tmp_path / "c.duckdb")
    df = candidate_table(source, gate, cache, calib, CAL_GRID, device="cpu", ray="local")
    _same(df, serial_cal)
    _one_row_each(cache, source, df, calib)


def test_a_killed_worker_is_retried_and_no_candidate_row_is_lost_or_doubled(cluster, models, serial, tmp_path,
                                                                          monkeypatch):
    source, gate = models["llama"]
    cache = Cache(tmp_path / "c.duckdb")
    marks = tmp_path / "marks"
    marks.mkdir()
    victims = {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"}
    real = _ray_candidates.candidate_task

    def dying(model_path, name, fp, device, **kw):  # a closure: pickled by value, calls the real task by reference
        flag = marks / name
        if name in victims and not flag.exists():
            flag.touch()
            os._exit(1)  # the worker process dies mid-task
        return real(model_path, name, fp, device, **kw)

    monkeypatch.setattr(_ray_candidates, "candidate_task", dying)
    df = candidate_table(source, gate, cache, None, GRID, device="cpu", ray="local")
    assert all((marks / v).exists() for v in victims)
    _same(df, serial["llama"])
    _one_row_each(cache, source, df)


def test_an_interrupted_ray_candidate_table_resumes_with_only_the_rest(cluster, models, serial, tmp_path, monkeypatch):
    source, gate = models["llama"]
    cache = Cache(tmp_path / "c.duckdb")
    two_d = {t.name for t in source.tensors() if len(t.shape) >= 2}
    first: list[str] = []

    class Stop(Exception):
        pass

    def stop(done, total, name):
        if name in two_d:  # the first tensor measured on the cluster: committed, then the run stops
            first.append(name)
            raise Stop

    with pytest.raises(Stop):
        candidate_table(source, gate, cache, None, GRID, device="cpu", ray="local", progress=stop)
    done = serial["llama"][serial["llama"]["tensor"] == first[0]]
    _one_row_each(cache, source, done)  # exactly the finished tensor's options are stored
    marks = tmp_path / "sent"
    marks.mkdir()
    real = _ray_candidates.candidate_task

    def counting(model_path, name, fp, device, **kw):
        (marks / name).touch()
        return real(model_path, name, fp, device, **kw)

    monkeypatch.setattr(_ray_candidates, "candidate_task", counting)
    df = candidate_table(source, gate, cache, None, GRID, device="cpu", ray="local")
    assert {p.name for p in marks.iterdir()} == two_d - {first[0]}  # only the rest was sent
    _same(df, serial["llama"])
    _one_row_each(cache, source, df)


def test_a_failing_candidate_task_is_an_error_naming_the_tensor(cluster, models, tmp_path, monkeypatch):
    source, gate = models["llama"]
    cache = Cache(tmp_path / "c.duckdb")
    bad = "model.layers.1.mlp.down_proj.weight"
    real = _ray_candidates.candidate_task

    def failing(model_path, name, fp, device, **kw):
        if name == bad:
            raise ValueError("this setting cannot be measured")
        return real(model_path, name, fp, device, **kw)

    monkeypatch.setattr(_ray_candidates, "candidate_task", failing)
    with pytest.raises(DistributedError, match=rf"{bad}.*ValueError: this setting cannot be measured.*cached"):
        candidate_table(source, gate, cache, None, GRID, device="cpu", ray="local")
    assert bad not in {json.loads(k)["tensor"] for k in _stored(cache, source.fingerprint, GATE_KIND)}


def test_a_candidate_worker_reading_another_model_is_refused(qwen_tok_dir, tiny_llama_tok_dir):
    cfg = registry.config_from_values("int", {"bits": 4, "group_size": None})
    with pytest.raises(DistributedError, match="differs from the driver"):
        _ray_candidates.candidate_task(str(tiny_llama_tok_dir), "model.layers.0.mlp.up_proj.weight",
                                       ModelSource.open(qwen_tok_dir).fingerprint, "cpu", options=[(cfg, True, False)],
                                       calib=None, gate_inputs=None)


def test_candidate_workers_do_not_import_streamlit(cluster, tiny_llama_tok_dir):
    @ray.remote
    def modules(path: str) -> bool:
        import sys

        from sahc_core.io.source import ModelSource
        from sahc_core.methods import registry
        from sahc_core.plans import _ray_candidates as rc  # what a task imports, then what it runs

        cfg = registry.config_from_values("int", {"bits": 4, "group_size": None})
        rc.candidate_task(path, "model.layers.0.mlp.up_proj.weight", ModelSource.open(path).fingerprint, "cpu",
                          options=[(cfg, True, False)], calib=None, gate_inputs=None)
        return "streamlit" in sys.modules

    assert ray.get(modules.remote(str(tiny_llama_tok_dir))) is False


def test_cli_optimize_ray_gives_the_serial_plan(cluster, tiny_llama_tok_dir, tmp_path, capsys, monkeypatch):
    from sahc_core.cli.main import main

    (tmp_path / "calib.txt").write_text(TEXT, encoding="utf-8")
    argv = ["optimize", "--model", str(tiny_llama_tok_dir), "--corpus", str(tmp_path / "calib.txt"), "--device", "cpu",
            "--target-ratio", "2.5", "--methods", "int", "--bits", "2,4,8", "--group-sizes", "row", "--no-calib",
            "--json"]
    outs = []
    for name, extra in (("serial", []), ("ray", ["--ray", "local:2"])):  # the test's session is joined
        monkeypatch.setenv("SAHC_CACHE", str(tmp_path / f"{name}.duckdb"))
        assert main([*argv, *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    serial_out, ray_out = outs
    for key in ("status", "ratio_projected", "bytes_projected", "n_candidates", "n_feasible", "original_bytes"):
        assert ray_out[key] == serial_out[key], key
    assert ray_out["predicted"] == pytest.approx(serial_out["predicted"], rel=1e-6)
    plan_r, plan_s = ray_out["plan"], serial_out["plan"]
    assert {k: v for k, v in plan_r.items() if k != "provenance"} == {k: v for k, v in plan_s.items() if k != "provenance"}
    prov_r, prov_s = plan_r["provenance"], plan_s["provenance"]
    assert prov_r["candidates"] == prov_s["candidates"] and prov_r["predicted_dloss"] == pytest.approx(
        prov_s["predicted_dloss"], rel=1e-6)


def test_cli_optimize_ray_without_ray_names_the_extra(tiny_llama_tok_dir, tmp_path, capsys, monkeypatch):
    from sahc_core.cli.main import main

    test_distributed.hide_ray(monkeypatch)
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    code = main(["optimize", "--model", str(tiny_llama_tok_dir), "--target-ratio", "2", "--ray", "local"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "sahc-explorer[ray]" in lines[0] and "Traceback" not in err, err
