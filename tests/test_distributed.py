"""sahc_core.runs.distributed: scans on a local Ray cluster equal the serial scan, resume, survive dead workers."""
from __future__ import annotations

import builtins
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sahc_core.cache import Cache
from sahc_core.io.source import ModelSource
from sahc_core.runs import distributed
from sahc_core.runs.distributed import DistributedError, parse_address, ray_scan
from sahc_core.spectra.scan import cached_scan, scan
from sahc_core.spectra.spectrum import CACHE_KIND

ray = pytest.importorskip("ray")

_VOLATILE = ["cached", "seconds", "compute_seconds", "device"]


@pytest.fixture(scope="module")
def cluster():
    """One local 2-CPU Ray cluster for the module (workers inherit this interpreter's import path)."""
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote
    def warm() -> int:  # both workers import torch and sahc_core once, as part of the startup
        from sahc_core.runs import distributed as d  # noqa: F401

        return os.getpid()

    ray.get([warm.remote() for _ in range(4)])
    yield
    ray.shutdown()


def _rows(cache: Cache, fp: str) -> list[str]:
    return [k for (k,) in cache.execute("SELECT key FROM results WHERE kind = ? AND model_fp = ?", [CACHE_KIND, fp])]


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal scan tables: identity columns and every statistic.

    Same code and data, but a Ray task runs BLAS on one thread: float64 sums in another order move the
    smallest σ by ~1e-11 relative (1e-14 of σ_max), hence rtol 1e-9 rather than bit equality.
    """
    a = a.drop(columns=_VOLATILE).reset_index(drop=True)
    b = b.drop(columns=_VOLATILE).reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and list(a["name"]) == list(b["name"])
    for col in a.columns:
        if pd.api.types.is_float_dtype(a[col]):
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=1e-9, atol=0, err_msg=col)
        else:
            assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), col


def test_ray_scan_of_tiny_qwen35_equals_the_serial_scan_and_commits_every_row(cluster, tiny_qwen35_dir, tmp_path):
    source = ModelSource.open(tiny_qwen35_dir)
    cache = Cache(tmp_path / "c.duckdb")
    seen = []
    df = ray_scan(source, cache=cache, address="local", device="cpu",
                  progress=lambda done, total, name, eta: seen.append((done, total, name, eta)))
    serial = scan(source, device="cpu")
    _same(df, serial)
    assert sorted(_rows(cache, source.fingerprint)) == sorted(serial["name"])
    assert [s[0] for s in seen] == list(range(1, len(serial) + 1)) and seen[-1][3] == 0
    _same(cached_scan(source, cache), serial)
    assert ray.is_initialized()  # a session it did not start is left running


@pytest.mark.slow  # a replacement worker imports torch again: ~15 s on 2 shared cores
def test_a_killed_worker_is_retried_and_no_row_is_lost_or_doubled(cluster, tiny_qwen35_dir, tmp_path):
    source = ModelSource.open(tiny_qwen35_dir)
    cache = Cache(tmp_path / "c.duckdb")
    marks = tmp_path / "marks"
    marks.mkdir()
    victims = {"model.language_model.embed_tokens.weight", "mtp.fc.weight"}

    def dying(model_path: str, name: str, fp: str, device: str) -> dict:
        flag = marks / name
        if name in victims and not flag.exists():
            flag.touch()
            os._exit(1)  # the worker process dies mid-task
        (marks / f"done-{name}").touch()
        return distributed.spectrum_task(model_path, name, fp, device)

    df = ray_scan(source, cache=cache, device="cpu", task=dying)
    assert all((marks / v).exists() for v in victims)
    rows = _rows(cache, source.fingerprint)
    assert len(rows) == len(set(rows)) == len(df) and set(rows) == set(df["name"])
    _same(df, scan(source, device="cpu"))


def test_an_interrupted_distributed_scan_resumes_with_only_the_rest(cluster, tiny_qwen35_dir, tmp_path):
    source = ModelSource.open(tiny_qwen35_dir)
    cache = Cache(tmp_path / "c.duckdb")

    class Stop(Exception):
        pass

    def stop(done, total, name, eta):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        ray_scan(source, cache=cache, device="cpu", progress=stop)
    assert len(_rows(cache, source.fingerprint)) == 3
    marks = tmp_path / "computed"
    marks.mkdir()

    def counting(model_path: str, name: str, fp: str, device: str) -> dict:
        (marks / name).touch()
        return distributed.spectrum_task(model_path, name, fp, device)

    df = ray_scan(source, cache=cache, device="cpu", task=counting)
    assert int(df["cached"].sum()) == 3 and len(list(marks.iterdir())) == len(df) - 3  # only the rest was sent
    assert len(_rows(cache, source.fingerprint)) == len(df)
    _same(df, scan(source, device="cpu"))


def test_a_worker_reading_another_model_is_refused(tiny_qwen35_dir, tiny_llama_dir):
    with pytest.raises(DistributedError, match="differs from the driver"):
        distributed.spectrum_task(str(tiny_llama_dir), "model.embed_tokens.weight",
                                  ModelSource.open(tiny_qwen35_dir).fingerprint, "cpu")


def hide_ray(monkeypatch) -> None:
    """Make ``import ray`` fail for the rest of the test, as on an install without the extra."""
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)


def test_addresses_and_the_missing_extra(monkeypatch):
    assert parse_address("local") == {"num_cpus": None, "include_dashboard": False}
    assert parse_address("local:3")["num_cpus"] == 3 and parse_address("auto") == {"address": "auto"}
    assert parse_address("10.0.0.1:6379") == {"address": "10.0.0.1:6379"}
    with pytest.raises(ValueError, match="local:N"):
        parse_address("local:0")
    hide_ray(monkeypatch)
    with pytest.raises(DistributedError, match=r"sahc-explorer\[ray\]"):
        distributed.connect("local")


def test_workers_do_not_import_streamlit(cluster):
    @ray.remote
    def modules() -> bool:
        import sys

        from sahc_core.runs import distributed as d  # noqa: F401 - what a task imports

        d.spectrum_task  # noqa: B018
        return "streamlit" in sys.modules

    assert ray.get(modules.remote()) is False


@pytest.mark.slow
def test_ray_scan_of_the_default_model_equals_the_serial_scan(cluster, default_model, tmp_path):
    source = ModelSource.open(default_model)
    cache = Cache(tmp_path / "c.duckdb")
    df = ray_scan(source, cache=cache, device="cpu")
    _same(df, scan(source, device="cpu"))
    assert sorted(_rows(cache, source.fingerprint)) == sorted(df["name"])


def test_cli_scan_ray_has_the_scan_keys_and_fills_the_cache(cluster, tiny_qwen35_dir, tmp_path, capsys):
    import json

    from sahc_core.cli.main import main

    db = tmp_path / "c.duckdb"
    argv = ["scan", "--model", str(tiny_qwen35_dir), "--cache", str(db), "--device", "cpu", "--json"]
    assert main([*argv, "--ray", "local:2"]) == 0  # the test's session is joined, not replaced
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ray"] == "local:2" and out["n_tensors"] == len(out["rows"]) > 0
    assert main([*argv, "--status"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert status["done"] == status["total"] == out["n_tensors"] and status["todo"] == []


def test_a_tensor_without_a_spectrum_is_recorded_and_the_ray_scan_goes_on(cluster, tiny_qwen35_dir, tmp_path):
    """As the serial scan: the bad tensor's row carries the reason, every other row its spectrum, and the
    reason is cached (a rerun and the serial scan read it back)."""
    from sahc_core.spectra.scan import ERROR_KIND, failed

    def nan_down_proj(model_path: str, name: str, fp: str, device: str) -> dict:  # a closure: pickled by value
        if name == BAD:  # what spectrum_task returns for a NumericalError
            return {"error": f"tensor {name!r} holds 1 NaN and 0 Inf value(s), so its spectrum is undefined."}
        return distributed.spectrum_task(model_path, name, fp, device)

    BAD = "model.language_model.layers.0.mlp.down_proj.weight"
    source = ModelSource.open(tiny_qwen35_dir)
    cache = Cache(tmp_path / "c.duckdb")
    df = ray_scan(source, cache=cache, address="local", device="cpu", task=nan_down_proj)
    bad = failed(df)
    assert bad["name"].tolist() == [BAD] and "NaN" in bad["error"].iloc[0]
    assert df[df["error"].isna()]["sigma_max"].gt(0).all() and len(df) == len(scan(source, device="cpu"))
    errors = cache.execute("SELECT key FROM results WHERE kind = ? AND model_fp = ?", [ERROR_KIND, source.fingerprint])
    assert [k for (k,) in errors] == [bad["name"].iloc[0]]
    again = scan(source, cache=cache, device="cpu")  # the serial scan reads the recorded reason back
    assert failed(again)["name"].tolist() == bad["name"].tolist() and again["cached"].all()
