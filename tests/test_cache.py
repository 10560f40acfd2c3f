"""DuckDB cache: round trips, JSON encoding, concurrency across processes, migrations, bad files."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pytest

from sahc_core.cache import MIGRATIONS, SCHEMA_VERSION, Cache, default_cache_path, from_json, to_json
from sahc_core.errors import CacheError

OPS_PER_WORKER = 100
BATCH = 5


def test_put_get_keys_roundtrip_and_upsert(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    assert cache.get("spectrum", "fp", "w", 1) is None
    cache.put("spectrum", "fp", "w", 1, {"s": [3.0, 2.0]})
    cache.put("spectrum", "fp", "a", 1, {"s": [1.0]})
    cache.put("spectrum", "fp", "w", 2, {"other": "version"})
    cache.put("spectrum", "fp", "w", 1, {"s": [5.0]})  # upsert replaces
    assert cache.get("spectrum", "fp", "w", 1) == {"s": [5.0]}
    assert cache.get("spectrum", "fp", "w", 2) == {"other": "version"}
    assert cache.keys("spectrum", "fp", 1) == ["a", "w"]
    assert cache.keys("spectrum", "other_fp", 1) == []
    assert cache.execute("SELECT count(*) FROM results") == [(3,)]


def test_json_values_numpy_torch_and_non_finite(tmp_path: Path) -> None:
    import torch  # imported here: spawned writer processes re-import this module

    value = {"f32": np.float32(0.25), "i64": np.int64(7), "arr": np.arange(4).reshape(2, 2),
             "t": torch.tensor([1.5, 2.5]), "path": Path("/x/y"), "tuple": (1, 2),
             "nan": float("nan"), "inf": float("inf"), "ninf": np.float64(-np.inf)}
    cache = Cache(tmp_path / "c.duckdb")
    cache.put("k", "fp", "key", 1, value)
    got = cache.get("k", "fp", "key", 1)
    assert got["f32"] == 0.25 and got["i64"] == 7 and got["arr"] == [[0, 1], [2, 3]]
    assert got["t"] == [1.5, 2.5] and got["path"] == "/x/y" and got["tuple"] == [1, 2]
    assert math.isnan(got["nan"]) and got["inf"] == math.inf and got["ninf"] == -math.inf
    # DuckDB sees the stored text as JSON and can extract from it.
    assert cache.execute("SELECT CAST(value->>'$.i64' AS INTEGER) FROM results") == [(7,)]
    assert from_json(to_json({"a": [1]})) == json.loads('{"a": [1]}')
    with pytest.raises(TypeError):
        to_json({"bad": object()})


def test_default_path_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SAHC_CACHE", raising=False)
    assert default_cache_path() == Path(__file__).resolve().parent.parent / "cache" / "sahc.duckdb"
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "env.duckdb"))
    assert default_cache_path() == tmp_path / "env.duckdb"
    assert Cache().path == tmp_path / "env.duckdb"


def test_plans_roundtrip(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.duckdb")
    cache.save_plan("int4", {"name": "int4", "default": {"method": "int", "bits": 4}})
    cache.save_plan("int4", {"name": "int4", "default": {"method": "int", "bits": 3}})
    assert cache.plans() == {"int4": {"name": "int4", "default": {"method": "int", "bits": 3}}}


def _writer(path: str, worker: int, n_ops: int) -> None:
    cache = Cache(path)
    for i in range(n_ops):
        if i % 2:
            cache.put("concurrent", "fp", f"{worker}-{i}", 1, {"worker": worker, "i": i})
        else:  # a batch of audit rows in one transaction
            cache.executemany("INSERT INTO audit_log (id, run_id, gate, value) VALUES (?, ?, ?, ?)",
                              [[f"{worker}-{i}-{j}", str(worker), "g", float(i)] for j in range(BATCH)])
        if i % 25 == 0:  # interleave reads with the writes
            cache.query_df("SELECT count(*) FROM results")


def test_three_processes_write_at_once_without_lock_errors_or_lost_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "c.duckdb")
    Cache(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, OPS_PER_WORKER)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cache = Cache(path)
    half = OPS_PER_WORKER // 2  # 50 single puts + 50 batches of 5 = 300 rows per worker
    assert cache.execute("SELECT count(*) FROM results WHERE kind = 'concurrent'") == [(3 * half,)]
    per_worker = cache.execute("SELECT run_id, count(*) FROM audit_log GROUP BY run_id ORDER BY run_id")
    assert per_worker == [(str(w), half * BATCH) for w in range(3)]


def test_threads_of_one_process_share_the_file(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cache = Cache(tmp_path / "c.duckdb")
    with ThreadPoolExecutor(4) as pool:  # same key from every thread: upserts must not conflict
        list(pool.map(lambda i: cache.put("t", "fp", str(i % 5), 1, {"i": i}), range(40)))
    with cache.connect() as conn:  # re-entrant: a connect() body may call execute()
        conn.execute("INSERT INTO plans VALUES ('p', '{}', NULL)")
        assert cache.execute("SELECT count(*) FROM results") == [(5,)]
    assert cache.plans() == {"p": {}}


def test_lock_held_too_long_raises_cache_error(tmp_path: Path) -> None:
    path = tmp_path / "c.duckdb"
    Cache(path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('ready', flush=True); time.sleep(30)", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(CacheError, match="stayed locked"):
            Cache(path, lock_timeout=0.3).execute("SELECT 1")
    finally:
        holder.kill()
        holder.wait()
    assert Cache(path).execute("SELECT 1") == [(1,)]  # usable once the holder is gone


def test_migrates_from_older_schema_keeping_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    conn = duckdb.connect(str(path))
    for stmt in MIGRATIONS[0]:  # a file written by schema version 1
        conn.execute(stmt)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO runs (run_id, status) VALUES ('r1', 'done')")
    conn.execute("INSERT INTO results VALUES ('k', 'fp', 'key', 1, '{\"x\": 1}', NULL)")
    conn.close()
    cache = Cache(path)
    assert SCHEMA_VERSION >= 2 and cache.schema_version() == SCHEMA_VERSION
    assert cache.execute("SELECT run_id, status, pid_start, log_path FROM runs") == [("r1", "done", None, None)]
    assert cache.get("k", "fp", "key", 1) == {"x": 1}
    assert Cache(path).schema_version() == SCHEMA_VERSION  # idempotent


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.duckdb"
    Cache(path).execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION + 1)])
    with pytest.raises(CacheError, match="newer"):
        Cache(path)


@pytest.mark.parametrize("content", [b"", b"this is not a database\n" * 200])
def test_corrupt_file_is_reported_and_never_deleted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.duckdb"
    path.write_bytes(content)
    with pytest.raises(CacheError, match="not a DuckDB database") as info:
        Cache(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == content


def _read_only_child(directory: str, queue) -> None:
    """Runs as an unprivileged user (root ignores file modes) and reports what Cache did."""
    if os.getuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    out: dict = {}
    cache = Cache(Path(directory) / "ro.duckdb", lock_timeout=2)
    out["read_only"] = cache.read_only
    out["get"] = cache.get("k", "fp", "key", 1)
    try:
        cache.put("k", "fp", "key2", 1, {})
    except CacheError as exc:
        out["put_error"] = str(exc)
    try:
        Cache(Path(directory) / "missing.duckdb", lock_timeout=2)
    except CacheError as exc:
        out["create_error"] = str(exc)
    queue.put(out)


def test_read_only_file_reads_but_refuses_writes() -> None:
    directory = tempfile.mkdtemp()  # not under pytest's 0700 tmp dir: the child may drop root
    try:
        path = Path(directory) / "ro.duckdb"
        Cache(path).put("k", "fp", "key", 1, {"v": 1})
        os.chmod(path, 0o444)
        os.chmod(directory, 0o555)
        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_read_only_child, args=(directory, queue))
        child.start()
        out = queue.get(timeout=60)
        child.join(timeout=30)
    finally:
        os.chmod(directory, 0o755)
    assert out["read_only"] is True
    assert out["get"] == {"v": 1}
    assert "read-only" in out["put_error"]
    assert "cannot be created" in out["create_error"]
