"""Shared helpers of the hardening tests (tests/test_hardening_*.py): the CLI's one-line refusal, plan files,
directory snapshots (the ``cache_path`` fixture is in conftest.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from sahc_core.cli.main import main

FFN = "model.layers.0.mlp.down_proj.weight"
INT8 = {"name": "int8", "default": {"method": "int", "bits": 8, "group_size": 32}}


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI; it must fail with exactly one ``error:`` line on stderr (never "unexpected"); that line."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"\[[\w.-]+\] stage ", ln)]
    assert code != 0, out
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "unexpected" not in lines[0] and "Traceback" not in err
    return lines[0]


def plan_file(tmp: Path, plan: dict | str, name: str = "plan.json") -> str:
    """Write ``plan`` (a dict as JSON, or text as is) to ``tmp/name``; its path."""
    p = tmp / name
    p.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    return str(p)


def file_tree(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes), to check that nothing changed."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
