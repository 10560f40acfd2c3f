"""Command-line flags generated from the method registry (``measure --method NAME --bits 4 ...``).

One flag per parameter name across every registered method (``--bits`` serves int-k, SVD factors
and TT cores; each method reads the flags it takes), plus each parameter's aliases (``--tt-bits``).
Values are parsed by the chosen method's own :class:`~sahc_core.methods.registry.Param`, so a
nullable parameter accepts its null label (``--group-size row``, ``--bits fp16``; ``0`` still means
per row for a group size). A flag a method does not take is an error, not silently ignored.
"""
from __future__ import annotations

import argparse
from typing import Any

from sahc_core.methods import registry


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_method_flags(sp: argparse.ArgumentParser) -> None:
    """``--method`` (choices from the registry) and every parameter's flag, all default None (= unset)."""
    specs = registry.methods()
    sp.add_argument("--method", required=True, choices=[m.name for m in specs],
                    help="; ".join(f"{m.name}: {m.title}" for m in specs))
    seen: dict[str, list[str]] = {}
    for m in specs:
        for p in m.params:
            for name in (p.name, *p.aliases):
                seen.setdefault(name, []).append(m.name)
    kinds = {p.name: p for m in specs for p in m.params} | {a: p for m in specs for p in m.params for a in p.aliases}
    for name, users in seen.items():
        p = kinds[name]
        nargs = "+" if p.kind == "int_list" else None
        sp.add_argument(_flag(name), dest=f"mp_{name}", default=None, nargs=nargs, metavar=name.upper(),
                        help=f"{p.help or name} ({', '.join(users)})")


def config_from_args(args: argparse.Namespace) -> Any:
    """The chosen method's config from the flags given (schema defaults for the rest)."""
    spec = registry.get(args.method)
    given = {k[3:]: v for k, v in vars(args).items() if k.startswith("mp_") and v is not None}
    values: dict[str, Any] = {}
    for p in spec.params:
        for name in (p.name, *p.aliases):
            if name in given:
                raw = given.pop(name)
                values[p.name] = p.parse(" ".join(raw) if isinstance(raw, list) else raw)
    if given:
        flags = ", ".join(_flag(n) for n in sorted(given))
        raise ValueError(f"method {spec.name!r} does not take {flags}; it takes "
                         f"{', '.join(_flag(p.name) for p in spec.params) or 'no parameters'}.")
    return registry.config_from_values(spec.name, values)
