"""Bounds on a plan, which is user input: bounded reading and parsing, and a fast first-match index.

A plan file is a regular file of at most :data:`MAX_PLAN_BYTES` (a device, a pipe or a larger file is
refused before it is read), nested at most :data:`MAX_DEPTH` levels (checked iteratively after
parsing; the parser's own recursion limit is turned into the same sentence), with at most
:data:`MAX_OVERRIDES` overrides of at most :data:`MAX_PATTERN_CHARS` characters. The limits fit a plan
with one override per tensor of a 10k-tensor model; :class:`OverrideIndex` resolves such a plan in
time linear in the tensors (a literal pattern is a dict look-up; only wildcard patterns are matched in
order, each compiled once).
"""
from __future__ import annotations

import json
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from sahc_core.errors import PlanError

MAX_PLAN_BYTES = 8 * 2**20
MAX_DEPTH = 16
MAX_OVERRIDES = 10_000
MAX_PATTERN_CHARS = 512
WILDCARDS = re.compile(r"[*?\[]")


def read_plan_file(path: str | Path) -> Any:
    """The parsed JSON of a plan file (bounded, see the module docstring); PlanError otherwise."""
    p = Path(path)
    try:
        if not stat.S_ISREG(p.stat().st_mode):
            raise PlanError(f"plan file {p} is not a regular file; give a plan JSON file.")
        with p.open("rb") as fh:
            data = fh.read(MAX_PLAN_BYTES + 1)
    except FileNotFoundError as exc:
        raise PlanError(f"plan file {p} does not exist; check the path.") from exc
    except OSError as exc:
        raise PlanError(f"plan file {p} is not readable ({exc.strerror or exc}); check its permissions.") from exc
    return parse_plan_text(data, where=f"plan file {p}")


def parse_plan_text(text: str | bytes, where: str = "the plan") -> Any:
    """The parsed JSON of plan text of at most :data:`MAX_PLAN_BYTES`, nested at most :data:`MAX_DEPTH`."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > MAX_PLAN_BYTES:
        raise PlanError(f"{where} is larger than {MAX_PLAN_BYTES >> 20} MiB; a plan needs only a default, "
                        "component configs and wildcard overrides.")
    try:
        data = json.loads(text)
    except RecursionError:
        raise PlanError(f"{where} is nested more than {MAX_DEPTH} levels deep; fix the file.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{where} is not valid JSON ({exc}); fix the file.") from exc
    check_depth(data, where)
    return data


def check_depth(data: Any, where: str = "the plan") -> None:
    """PlanError when ``data`` nests objects/lists more than :data:`MAX_DEPTH` levels (iteratively)."""
    stack = [(data, 1)]
    while stack:
        obj, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise PlanError(f"{where} is nested more than {MAX_DEPTH} levels deep; fix the file.")
        children = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (Mapping, list, tuple)))


class _Pattern(Protocol):
    pattern: str

    def matches(self, name: str) -> bool: ...


class OverrideIndex:
    """Index of the first override matching a name: literal patterns by look-up, wildcards in order."""

    def __init__(self, overrides: tuple[_Pattern, ...]) -> None:
        self.literal: dict[str, int] = {}
        self.wild: list[tuple[int, _Pattern]] = []
        for i, o in enumerate(overrides):
            if WILDCARDS.search(o.pattern) is None:
                self.literal.setdefault(o.pattern, i)
            else:
                self.wild.append((i, o))

    def first(self, name: str) -> int | None:
        """Index of the first override whose pattern matches ``name``, or None."""
        hit = self.literal.get(name)
        for i, o in self.wild:
            if hit is not None and i > hit:
                break
            if o.matches(name):
                return i
        return hit
