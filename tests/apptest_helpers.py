"""Running one dashboard page file under AppTest with a chosen model and a cache in a temp dir."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def run_page(page: str, model_dir, monkeypatch, tmp_path, timeout: float = 120) -> AppTest:
    """Run ``app_pages/<page>.py`` once with ``model_path = model_dir`` and ``SAHC_CACHE`` in ``tmp_path``."""
    monkeypatch.setenv("SAHC_CACHE", str(tmp_path / "c.duckdb"))
    monkeypatch.syspath_prepend(str(ROOT))  # pages import app_state from the repo root
    at = AppTest.from_file(str(ROOT / "app_pages" / f"{page}.py"), default_timeout=timeout)
    at.session_state["model_path"] = str(model_dir)
    return at.run()
