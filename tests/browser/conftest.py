"""Real-browser fixtures: the app served by ``streamlit run`` on a free localhost port, driven by
Debian's chromium through Playwright. Every test here is marked ``browser`` (skipped by default:
``pytest -m browser`` runs them) and the whole folder skips cleanly without chromium or Playwright.

Screenshots go to ``test-artifacts/screenshots/`` (git-ignored).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = os.environ.get("SAHC_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
MODEL_INPUT = "Local HuggingFace model directory"

sys.path.insert(0, str(REPO / "tests"))


def _require_browser() -> None:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``streamlit run app.py`` in a child process; ``stop`` ends exactly that process group."""

    def __init__(self, cache: Path, log: Path) -> None:
        self.port = free_port()
        self.cache = cache
        self.url = f"http://localhost:{self.port}"
        env = {**os.environ, "SAHC_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
        streamlit = str(REPO / ".venv" / "bin" / "streamlit")
        if not Path(streamlit).exists():
            streamlit = shutil.which("streamlit") or streamlit
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [streamlit, "run", "app.py", "--server.port", str(self.port), "--server.headless", "true",
             "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_healthy()

    def _wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"streamlit did not become healthy in {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # the group we started (start_new_session): streamlit only
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny llama fixture (same builder as tests/conftest.py)."""
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("browser_llama"), shards=2)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[AppServer]:
    _require_browser()
    d = tmp_path_factory.mktemp("browser_app")
    cache = d / "sahc.duckdb"
    from sahc_core.cache import Cache
    from sahc_core.plans.plan import CompressionPlan, save_plan

    # a saved plan, so the Runs page can launch a run without an upload
    save_plan(Cache(cache), CompressionPlan.from_dict(
        {"name": "browser-int8", "default": {"method": "int", "bits": 8, "group_size": 32}}))
    srv = AppServer(cache, d / "streamlit.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    yield pg
    ctx.close()


@pytest.fixture(scope="session")
def shots() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


WHOLE = {"text": "shakespeare", "text_sha256": "ab" * 32, "tokens": 63989, "window": 2048, "stride": 2048,
         "dtype": "float32", "device": "cpu", "max_tokens": None}
CAPPED = {**WHOLE, "tokens": 4064, "max_tokens": 4096}


@pytest.fixture(scope="module")
def meeting(tmp_path_factory, tiny_model):
    """A server of its own whose cache holds finished runs of the tiny model under two protocols and one
    'running' run with a live stand-in worker (``sleep``)."""
    from sahc_core.cache import Cache, to_json, utcnow
    from sahc_core.io.source import ModelSource
    from sahc_core.runs.jobs import process_start_time

    _require_browser()
    d = tmp_path_factory.mktemp("meeting")
    cache = Cache(d / "sahc.duckdb")
    fp = ModelSource.open(tiny_model).fingerprint
    now = utcnow()
    for rid, plan, ratio, ppl, base, proto in (("r-int4", "int4-g32", 3.9, 52.58, 33.07, WHOLE),
                                               ("r-int8", "int8", 1.99, 29.28, 29.24, CAPPED),
                                               ("r-int2", "int2", 7.5, 46218.0, 33.07, WHOLE)):
        res = {"run_id": rid, "plan_name": plan, "ratio_projected": ratio, "ratio_actual": ratio, "ppl": ppl,
               "baseline_ppl": base, "delta_ppl": ppl - base, "gates_passed": 9, "gates_failed": 0,
               "protocol": proto, "components": []}
        cache.execute("INSERT INTO runs (run_id, plan_name, plan, model_fp, status, stage, result, started_at, "
                      "finished_at) VALUES (?, ?, ?, ?, 'done', 'done', ?, ?, ?)",
                      [rid, plan, json.dumps({"name": plan, "default": {"method": "int", "bits": 4, "group_size": 32}}),
                       fp, to_json(res), now, now])
    worker = subprocess.Popen(["sleep", "900"], start_new_session=True)
    cache.execute("INSERT INTO runs (run_id, plan_name, model_fp, status, stage, progress, pid, pid_start, "
                  "cancel_requested, started_at) VALUES ('r-live', 'tt', ?, 'running', 'assemble', ?, ?, ?, false, ?)",
                  [fp, to_json({"stage": "assemble", "tensors_done": 3, "tensors_total": 12, "fraction": 0.25}),
                   worker.pid, process_start_time(worker.pid), now])
    srv = AppServer(d / "sahc.duckdb", d / "streamlit.log")
    yield srv, cache
    srv.stop()
    worker.kill()
    worker.wait()
