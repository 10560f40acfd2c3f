"""Background jobs: reporter lifecycle, cancel (flag and SIGTERM), a SIGKILLed worker, reused pids."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sahc_core.cache import Cache
from sahc_core.errors import JobError
from sahc_core.runs.jobs import (DIED, LIST_COLUMNS, JobCancelled, JobReporter, cancel_run, list_runs, process_start_time,
                            reap_dead, run_status, start_run)

REPO = Path(__file__).resolve().parent.parent

# A stand-in worker: the same JobReporter protocol as `python -m sahc_core run`, but it only counts.
WORKER = """
import sys, time
from sahc_core.cache import Cache
from sahc_core.runs.jobs import JobCancelled, JobReporter
rep = JobReporter(Cache(sys.argv[1]), sys.argv[2])
rep.start(plan={"name": "fake"})
rep.stage("work")
try:
    for i in range(1, 100000):
        rep.progress(tensors_done=i, tensors_total=100000)
        time.sleep(0.01)
except JobCancelled:
    rep.cancelled()
    sys.exit(1)
"""


def _spawn_worker(cache: Cache, run_id: str) -> subprocess.Popen:
    cache.execute("INSERT INTO runs (run_id, status, cancel_requested) VALUES (?, 'queued', false)", [run_id])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(cache.path), run_id], cwd=str(REPO), env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(pred, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _progress_seen(cache: Cache, run_id: str):
    st = run_status(cache, run_id)
    return st if st["status"] == "running" and (st["progress"] or {}).get("tensors_done", 0) > 0 else None


def test_reporter_lifecycle_throttles_and_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    rep = JobReporter(cache, "r1")
    rep.start(plan={"name": "int4"}, model_path="/m", model_fp="fp")
    st = run_status(cache, "r1")
    assert st["status"] == "running" and st["pid"] == os.getpid() and st["plan_name"] == "int4"
    assert st["pid_start"] == process_start_time(os.getpid()) and st["alive"]
    writes = []
    real = cache.execute
    monkeypatch.setattr(cache, "execute", lambda sql, p=(): (writes.append(sql) if sql.startswith("UPDATE") else None,
                                                             real(sql, p))[1])
    rep.stage("assemble")
    for i in range(1, 201):  # 200 calls in well under a second: throttled to a few writes
        rep.progress(tensors_done=i, tensors_total=200)
    assert 2 <= len(writes) <= 6
    prog = run_status(cache, "r1")["progress"]
    assert prog["stage"] == "assemble" and prog["tensors_done"] == 200 and prog["fraction"] == 1.0
    assert prog["eta_s"] == 0.0
    rep.finish({"ratio_projected": 4.0, "ratio_actual": 3.9, "ppl": 12.0, "baseline_ppl": 10.0, "delta_ppl": 2.0,
                "gates_passed": 7, "gates_failed": 1})
    st = run_status(cache, "r1")
    assert st["status"] == "done" and st["result"]["ppl"] == 12.0 and st["finished_at"] is not None
    assert not st["alive"] and st["duration_s"] >= 0
    df = list_runs(cache)
    assert list(df.columns) == LIST_COLUMNS and len(df) == 1
    row = df.iloc[0]
    assert (row["ratio_actual"], row["delta_ppl"], row["gates_failed"]) == (3.9, 2.0, 1)


def test_eta_from_rate(tmp_path: Path) -> None:
    rep = JobReporter(Cache(tmp_path / "c.duckdb"), "r")
    rep.start()
    rep.stage("ppl")
    rep._stage_t0 -= 10.0  # 10 s into the stage with a quarter done -> 30 s left
    rep.progress(tokens_done=25, tokens_total=100)
    assert rep._progress["eta_s"] == pytest.approx(30.0, rel=0.05)
    assert rep._progress["fraction"] == 0.25


def test_cancel_flag_is_seen_by_check_cancel(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    rep = JobReporter(cache, "r2")
    rep.start()
    rep.check_cancel(force=True)  # nothing asked yet
    cache.execute("UPDATE runs SET cancel_requested = true WHERE run_id = 'r2'")
    with pytest.raises(JobCancelled):
        rep.check_cancel(force=True)
    rep.cancelled()
    assert run_status(cache, "r2")["status"] == "cancelled"
    cancel_run(cache, "r2")  # finished runs: a no-op
    with pytest.raises(JobError, match="no run"):
        run_status(cache, "nope")


def test_worker_process_progress_then_cancel(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    proc = _spawn_worker(cache, "w1")
    try:
        st = _wait_for(lambda: _progress_seen(cache, "w1"))
        assert st["alive"] and st["pid"] == proc.pid and st["stage"] == "work"
        cancel_run(cache, "w1")  # flag + SIGTERM to the group
        assert proc.wait(timeout=30) == 1, proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    st = run_status(cache, "w1")
    assert st["status"] == "cancelled" and st["cancel_requested"] is True and not st["alive"]


def test_sigkilled_worker_is_marked_failed_and_cache_stays_intact(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    proc = _spawn_worker(cache, "w2")
    try:
        _wait_for(lambda: _progress_seen(cache, "w2"))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    df = list_runs(cache)
    row = df[df["run_id"] == "w2"].iloc[0]
    assert row["status"] == "failed" and row["error"] == DIED
    # the file is fine: migrations, counts and new writes all work
    again = Cache(cache.path)
    assert again.execute("SELECT count(*) FROM runs") == [(1,)]
    again.put("k", "fp", "x", 1, {"ok": True})
    assert again.get("k", "fp", "x", 1) == {"ok": True}


def test_reused_pid_is_not_mistaken_for_the_worker(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    me, start = os.getpid(), process_start_time(os.getpid())
    assert start is not None
    cache.execute("INSERT INTO runs (run_id, status, pid, pid_start) VALUES ('same', 'running', ?, ?), "
                  "('reused', 'running', ?, ?), ('queued_no_pid', 'queued', NULL, NULL)", [me, start, me, "1"])
    assert reap_dead(cache) == ["reused"]
    status = dict(cache.execute("SELECT run_id, status FROM runs"))
    assert status == {"same": "running", "reused": "failed", "queued_no_pid": "queued"}


def test_start_run_refuses_bad_inputs_before_queueing(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from sahc_core.errors import ModelError, PlanError

    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(ModelError):
        start_run(cache, {"name": "p", "default": {"method": "int", "bits": 4}}, tmp_path / "missing")
    with pytest.raises((PlanError, ValueError)):
        start_run(cache, {"name": "p", "default": {"method": "nope"}}, tiny_llama_dir)
    assert cache.execute("SELECT count(*) FROM runs") == [(0,)]


def test_delete_run_files_frees_disk_and_keeps_the_results(tmp_path) -> None:
    from sahc_core.plans.assemble import MANIFEST
    from sahc_core.cache import to_json, utcnow
    from sahc_core.paths import MARKER, mark_owned
    from sahc_core.runs.jobs import delete_run_files, run_files

    cache = Cache(tmp_path / "c.duckdb")
    elsewhere = mark_owned(tmp_path / "my-checkpoints" / "a")  # a run given its own out_dir (assembled by SAHC)
    (elsewhere / MANIFEST).write_text("{}")
    (elsewhere / "model.safetensors").write_bytes(b"\0" * 1000)
    size = 1002 + (elsewhere / MARKER).stat().st_size
    now = utcnow()
    cache.execute("INSERT INTO runs (run_id, plan_name, status, result, started_at, finished_at) VALUES "
                  "('a', 'p', 'done', ?, ?, ?)", [to_json({"ppl": 12.5, "out_dir": str(elsewhere)}), now, now])
    cache.execute("INSERT INTO runs (run_id, plan_name, status, started_at) VALUES ('live', 'p', 'running', ?)", [now])
    partial = tmp_path / "runs" / "live"
    partial.mkdir(parents=True)
    assert list_runs(cache).set_index("run_id").loc["a", "checkpoint_mb"] == pytest.approx(size / 1e6)
    assert delete_run_files(cache, "a") == size
    assert not elsewhere.exists() and elsewhere.parent.exists()
    st = run_status(cache, "a")
    assert st["result"]["ppl"] == 12.5 and "files_deleted_at" in st["result"]
    assert run_files(cache, "a") is None and delete_run_files(cache, "a") == 0
    with pytest.raises(JobError, match="still"):  # no pid yet: a run being started stays 'running'
        delete_run_files(cache, "live")
    assert partial.exists()


def test_delete_run_files_never_removes_an_unrecognised_directory(tmp_path) -> None:
    from sahc_core.cache import to_json, utcnow
    from sahc_core.runs.jobs import delete_run_files

    cache = Cache(tmp_path / "c.duckdb")
    precious = tmp_path / "home"  # an out_dir without our manifest (e.g. a typo'd path)
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    cache.execute("INSERT INTO runs (run_id, plan_name, status, result, started_at) VALUES ('b', 'p', 'failed', ?, ?)",
                  [to_json({"out_dir": str(precious)}), utcnow()])
    assert delete_run_files(cache, "b") == 0 and (precious / "notes.txt").exists()


def test_list_runs_without_disk_sizes_for_polling(tmp_path, monkeypatch) -> None:
    import sahc_core.runs.jobs as jobs
    from sahc_core.cache import to_json, utcnow

    cache = Cache(tmp_path / "c.duckdb")
    cache.execute("INSERT INTO runs (run_id, plan_name, status, result, started_at) VALUES ('a', 'p', 'done', ?, ?)",
                  [to_json({"ppl": 1.0}), utcnow()])
    monkeypatch.setattr(jobs, "_checkpoint_mb", lambda *a: pytest.fail("walked the disk while polling"))
    df = list_runs(cache, disk=False)
    assert list(df.columns) == LIST_COLUMNS and df["checkpoint_mb"].isna().all()
