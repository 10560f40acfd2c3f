"""The Streamlit server config (.streamlit/config.toml): a file watcher that stays quiet during runs."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_file_watcher_polls_only_the_app_sources():
    from streamlit.watcher.folder_black_list import FolderBlackList

    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    # watchdog would watch the whole repository recursively (inotify queue overflow during a run)
    assert server["fileWatcherType"] == "poll" and server["runOnSave"] is False
    black = FolderBlackList(server["folderWatchBlacklist"])
    for ignored in (".venv/lib/python3.11/site-packages/torch/__init__.py", "cache/models/m/config.py",
                    "test-artifacts/screenshots/x.py", "tests/test_cache.py"):
        assert black.is_blacklisted(str(ROOT / ignored)), ignored
    for watched in ("app.py", "app_pages/runs.py", "sahc_core/cache.py", "sahc_core/runs/jobs.py"):
        assert not black.is_blacklisted(str(ROOT / watched)), watched
