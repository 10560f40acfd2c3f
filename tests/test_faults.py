"""Bad input and fault suite: every failure is one clear line (CLI) or one st.error (UI), never a
traceback, and nothing already stored in the cache is lost.

Each CLI case first stores a sentinel result in the cache, provokes the failure with
``sahc_core.cli.main.main([...])`` and then reads the sentinel back. UI cases run the real pages through
app.py with ``AppTest`` and check that ``st.error`` shows and ``at.exception`` is empty. Parameter
faults that the widgets cannot produce (bits 0/1/17, rank 0: number inputs and sliders are bounded)
are CLI-only; the pages show the same ``str(exc)`` through ``app_state.show_error``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from sahc_core.cache import Cache
from sahc_core.cli.main import main

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app.py")
SENTINEL = ("fault_sentinel", "fp", "k", 1, {"value": 42, "note": "stored before the fault"})
FFN = "model.layers.0.mlp.down_proj.weight"        # 64 x 128 in the tiny llama
EMB = "model.embed_tokens.weight"                   # 256 x 64


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path, monkeypatch) -> Path:
    """A cache file holding a sentinel result; SAHC_CACHE points at it."""
    path = tmp_path / "cache" / "c.duckdb"
    Cache(path).put(*SENTINEL)
    monkeypatch.setenv("SAHC_CACHE", str(path))
    return path


def sentinel_kept(path: Path) -> bool:
    return Cache(path).get(*SENTINEL[:4]) == SENTINEL[4]


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


# -- bad model directories (shared by the CLI and the UI cases) -------------------------------------
def _missing(tmp, good):
    return tmp / "no-such-model"


def _empty(tmp, good):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _config_only(tmp, good):
    d = tmp / "config-only"
    d.mkdir()
    shutil.copy(good / "config.json", d)
    return d


def _pickle_only(tmp, good):
    d = _config_only(tmp, good)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not unpickled, ever")
    return d


def _copy(tmp, good):
    d = tmp / "copy"
    shutil.copytree(good, d)
    return d


def _truncated(tmp, good):
    d = _copy(tmp, good)
    shard = _shards(d)[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return d


def _corrupt_header(tmp, good):
    d = _copy(tmp, good)
    shard = _shards(d)[0]
    raw = bytearray(shard.read_bytes())
    raw[8:40] = b"{\x00\xff garbage, not json \x01\x02\x03"[:32].ljust(32, b"#")
    shard.write_bytes(bytes(raw))
    return d


def _missing_shard(tmp, good):
    d = _copy(tmp, good)
    _shards(d)[-1].unlink()
    return d


MODEL_FAULTS = {
    "missing directory": (_missing, "does not exist"),
    "empty directory": (_empty, "config.json"),
    "config without weights": (_config_only, "safetensors"),
    "pickle-only checkpoint": (_pickle_only, "pickle"),
    "truncated safetensors": (_truncated, "truncated"),
    "corrupt header": (_corrupt_header, "safetensors"),
    "missing shard": (_missing_shard, "missing"),
}


def cli_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    # `run` reports progress on stderr as "[run-id] stage ..." lines; the error itself is one line
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"\[[\w-]+\] stage ", ln)]
    assert code != 0, out
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("kind", list(MODEL_FAULTS))
def test_cli_bad_model_directory(kind, tiny_llama_dir, tmp_path, store, capsys):
    make, expect = MODEL_FAULTS[kind]
    d = make(tmp_path, tiny_llama_dir)
    line = cli_error(capsys, ["inspect", "--model", str(d)])
    assert expect in line.lower(), line
    assert sentinel_kept(store)


# -- bad parameters and names (CLI) ------------------------------------------------------------------
def _plan_file(tmp, plan: dict) -> str:
    p = tmp / "plan.json"
    p.write_text(json.dumps(plan))
    return str(p)


PARAM_FAULTS = {
    "tensor name that does not exist": (["spectrum", "--tensor", "model.nope.weight"], "no tensor named"),
    "1-D tensor asked for a spectrum": (["spectrum", "--tensor", "model.norm.weight"], "1-d"),
    "rank 0": (["measure", "--tensor", FFN, "--method", "svd", "--rank", "0"], "rank"),
    "rank > min(m, n)": (["measure", "--tensor", FFN, "--method", "svd", "--rank", "65"], "exceeds"),
    "bits 0": (["measure", "--tensor", FFN, "--method", "int", "--bits", "0"], "bits"),
    "bits 1": (["measure", "--tensor", FFN, "--method", "int", "--bits", "1"], "bits"),
    "bits 17": (["measure", "--tensor", FFN, "--method", "int", "--bits", "17"], "bits"),
    "negative group size": (["measure", "--tensor", FFN, "--method", "int", "--group-size", "-8"], "group_size"),
    "flag the method does not take": (["measure", "--tensor", FFN, "--method", "int", "--rank", "4"], "does not take"),
    "TT ranks that do not fit": (["measure", "--tensor", EMB, "--method", "tt", "--tt-ranks", "1", "100000",
                                  "100000", "1"], "rank"),
    "TT ranks without boundary 1": (["measure", "--tensor", EMB, "--method", "tt", "--tt-ranks", "2", "8", "8", "2"],
                                    "rank"),
}


@pytest.mark.parametrize("kind", list(PARAM_FAULTS))
def test_cli_bad_parameters(kind, tiny_llama_dir, store, capsys):
    argv, expect = PARAM_FAULTS[kind]
    line = cli_error(capsys, [*argv, "--model", str(tiny_llama_dir), "--device", "cpu"])
    assert expect in line.lower(), line
    assert sentinel_kept(store)


def test_cli_plan_leaving_tensors_uncovered(tiny_llama_dir, tmp_path, store, capsys):
    plan = _plan_file(tmp_path, {"name": "ffn-only", "default": None,
                                 "components": {"ffn": {"method": "int", "bits": 4, "group_size": 32}}})
    line = cli_error(capsys, ["plan", "--plan", plan, "--model", str(tiny_llama_dir)])
    assert "uncovered" in line and "model.embed_tokens.weight" in line
    assert sentinel_kept(store)


@pytest.mark.parametrize("content,expect", [(b"", "empty"), (bytes(range(256)) * 64, "text")],
                         ids=["corpus empty", "corpus binary"])
def test_cli_bad_corpus(content, expect, tiny_llama_dir, tmp_path, store, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    line = cli_error(capsys, ["ppl", "--corpus", str(corpus), "--model", str(tiny_llama_dir), "--device", "cpu"])
    assert expect in line.lower() and str(corpus) in line
    assert sentinel_kept(store)


# -- cache faults --------------------------------------------------------------------------------------
def test_cli_corrupt_cache_file_is_refused_and_left_alone(tiny_llama_dir, tmp_path, store, capsys):
    bad = tmp_path / "corrupt.duckdb"
    bad.write_bytes(b"this is not a duckdb database\n" * 100)
    before = bad.read_bytes()
    line = cli_error(capsys, ["spectrum", "--tensor", FFN, "--model", str(tiny_llama_dir), "--cache", str(bad)])
    assert "not a duckdb database" in line.lower() and str(bad) in line
    assert bad.read_bytes() == before and sentinel_kept(store)


@pytest.fixture()
def read_only_cache(tmp_path):
    """The sentinel cache on a read-only bind mount (root ignores file modes, so chmod is not enough)."""
    src, mnt = tmp_path / "ro-src", tmp_path / "ro"
    src.mkdir()
    mnt.mkdir()
    Cache(src / "c.duckdb").put(*SENTINEL)
    if os.geteuid() != 0:
        os.chmod(src / "c.duckdb", 0o444)
        os.chmod(src, 0o555)
        yield src / "c.duckdb"
        os.chmod(src, 0o755)
        return
    ok = subprocess.run(["mount", "--bind", str(src), str(mnt)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mnt)], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        pytest.skip("cannot make a read-only mount here (running as root without mount rights)")
    try:
        yield mnt / "c.duckdb"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_cli_read_only_cache(tiny_llama_dir, read_only_cache, capsys):
    line = cli_error(capsys, ["spectrum", "--tensor", FFN, "--model", str(tiny_llama_dir), "--device", "cpu",
                              "--cache", str(read_only_cache)])
    assert "read-only" in line or "not writable" in line
    assert Cache(read_only_cache).get(*SENTINEL[:4]) == SENTINEL[4]


_WRITER = """
import sys, time
from sahc_core.cache import Cache
c = Cache(sys.argv[1])
for i in range(40):
    c.put("second_instance", "fp", str(i), 1, {"i": i})
    time.sleep(0.02)
"""


def test_second_instance_on_the_same_cache(tiny_llama_dir, store, capsys):
    """A second process writing the same cache while the CLI computes: no lock error, no lost row."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(store)], cwd=REPO)
    try:
        for name in (FFN, EMB, "model.layers.1.mlp.up_proj.weight"):
            assert main(["spectrum", "--tensor", name, "--model", str(tiny_llama_dir), "--device", "cpu",
                         "--json"]) == 0
    finally:
        assert proc.wait(timeout=120) == 0
    capsys.readouterr()
    c = Cache(store)
    assert len(c.keys("second_instance", "fp", 1)) == 40 and sentinel_kept(store)
    assert len(c.keys("spectrum", __import__("sahc_core.io.source", fromlist=["x"]).ModelSource.open(
        tiny_llama_dir).fingerprint, 1)) >= 3


# -- jobs and checkpoint writes -------------------------------------------------------------------------
def _int8_plan() -> dict:
    return {"name": "int8", "default": {"method": "int", "bits": 8, "group_size": 32}}


def test_job_killed_with_sigkill_is_marked_failed(tiny_llama_dir, store):
    from sahc_core.runs.jobs import list_runs, start_run

    cache = Cache(store)
    run_id = start_run(cache, _int8_plan(), tiny_llama_dir)
    pid = cache.execute("SELECT pid FROM runs WHERE run_id = ?", [run_id])[0][0]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = list_runs(cache).set_index("run_id").loc[run_id]
        if row["status"] not in ("queued", "running"):
            break
        time.sleep(0.2)
    assert row["status"] == "failed" and "died" in str(row["error"])
    assert sentinel_kept(store)


def test_disk_full_on_checkpoint_write_is_not_reported_done(tiny_llama_dir, tmp_path, store, capsys, monkeypatch):
    import sahc_core.plans.assemble as asm

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)               # half-written shard, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(asm, "save_file", full_disk)
    line = cli_error(capsys, ["run", "--plan", _plan_file(tmp_path, _int8_plan()), "--model", str(tiny_llama_dir),
                              "--cache", str(store)])
    assert "No space left on device" in line
    cache = Cache(store)
    rows = cache.execute("SELECT status, result FROM runs")
    assert rows and all(status == "failed" and result is None for status, result in rows)
    runs_dir = store.parent / "runs"
    assert not list(runs_dir.rglob("manifest.json")) and not list(runs_dir.rglob("*.safetensors"))
    assert sentinel_kept(store)


# -- UI ------------------------------------------------------------------------------------------------
def _app(model: str | None, page: str | None = None) -> AppTest:
    import streamlit as st

    st.cache_resource.clear()  # app_state caches the cache handle per process; SAHC_CACHE changes per test
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    if model is not None:
        at.session_state["model_path"] = model
    at.run()
    if page:
        at.switch_page(page).run()
    return at


@pytest.mark.parametrize("kind", list(MODEL_FAULTS))
@pytest.mark.parametrize("page", ["app_pages/model.py", "app_pages/report.py"])
def test_ui_bad_model_directory(kind, page, tiny_llama_dir, tmp_path, store):
    make, expect = MODEL_FAULTS[kind]
    at = _app(str(make(tmp_path, tiny_llama_dir)), page)
    assert not at.exception
    assert at.error and expect in at.error[0].value.lower()
    assert sentinel_kept(store)


@pytest.mark.parametrize("widgets,expect", [
    ({"budget_embedding_method": "Tensor-Train", "budget_embedding_tt_tt_ranks": "1, 100000, 100000, 1",
      "budget_fallback": "none (adapt, else error)"}, "rank"),
    ({"budget_embedding_method": "Tensor-Train", "budget_embedding_tt_tt_ranks": "64, x",
      "budget_fallback": "none (adapt, else error)"}, "tt-ranks"),
], ids=["TT ranks that do not fit", "TT ranks that are not integers"])
def test_ui_budget_bad_parameters(widgets, expect, tiny_llama_dir, store):
    import streamlit as st

    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_path"] = str(tiny_llama_dir)
    for k, v in widgets.items():
        at.session_state[k] = v
    at.run()
    at.switch_page("app_pages/budget.py").run()
    assert not at.exception
    assert at.error and expect in at.error[0].value.lower()
    assert sentinel_kept(store)


def test_ui_corrupt_cache(tiny_llama_dir, tmp_path, monkeypatch):
    bad = tmp_path / "corrupt.duckdb"
    bad.write_bytes(b"garbage" * 500)
    monkeypatch.setenv("SAHC_CACHE", str(bad))
    at = _app(str(tiny_llama_dir), "app_pages/runs.py")
    assert not at.exception
    assert at.error and "not a duckdb database" in at.error[0].value.lower()
    assert bad.read_bytes() == b"garbage" * 500


def test_ui_read_only_cache_report(tiny_llama_dir, read_only_cache, monkeypatch):
    monkeypatch.setenv("SAHC_CACHE", str(read_only_cache))
    at = _app(str(tiny_llama_dir), "app_pages/report.py")
    at.button(key="report_build").click().run()
    assert not at.exception
    assert at.error and ("read-only" in at.error[0].value or "not writable" in at.error[0].value)
    assert Cache(read_only_cache).get(*SENTINEL[:4]) == SENTINEL[4]


def test_ui_bad_corpus_on_runs_page(tiny_llama_dir, tmp_path, store):
    """An empty corpus: an st.error at once, or (jobs validating it in the worker) the failed run's
    one-line reason in the runs table; never a traceback, never a 'done' run."""
    from sahc_core.runs.jobs import list_runs
    from sahc_core.plans.plan import CompressionPlan, save_plan

    save_plan(Cache(store), CompressionPlan.from_dict(_int8_plan()))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    at = _app(str(tiny_llama_dir), "app_pages/runs.py")
    at.text_input(key="runs_corpus").input(str(empty)).run()
    at.button(key="runs_start").click().run()
    assert not at.exception
    if not at.error:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and list_runs(Cache(store))["status"].isin(["queued", "running"]).any():
            time.sleep(0.5)
        at.run()
        assert not at.exception
        runs = at.dataframe[0].value
        assert (runs["status"] == "failed").all()
        assert runs["error"].str.contains("is empty").all(), runs["error"].tolist()
    else:
        assert "empty" in at.error[0].value
    assert sentinel_kept(store)
