"""Method parameters: the :class:`Param` schema and the conversions it drives.

One :class:`Param` per plan-JSON key of a method (type, range, default, nullability, where a widget
offers it): :meth:`Param.parse` reads CLI text, :meth:`Param.to_json` is the ``methods --json`` entry,
:func:`config_from_values` builds a config from parameter values (CLI flags, widgets) and
:func:`config_from_dict` / :func:`config_to_dict` convert between a config and its plan JSON. The
method lookups come from :mod:`sahc_core.methods.registry`, which re-exports every name here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_PARAM_KINDS = ("int", "float", "choice", "int_list")
_SCOPES = ("both", "tensor", "plan", "json")


@dataclass(frozen=True)
class Param:
    """One parameter of a method: the plan-JSON key, the CLI flag ``--name`` and a widget.

    Parameters
    ----------
    name : str
        Plan-JSON key (``group_size``); the CLI flag is ``--group-size``.
    kind : {"int", "float", "choice", "int_list"}
    default : Any
        Value when not given (``None`` allowed when ``nullable``).
    field : str, optional
        The config attribute it sets (default: ``name``).
    choices : tuple
        Allowed values of a ``choice`` (or suggested values of an int/float for widgets).
    min, max : float, optional
        Inclusive range of an ``int`` / ``float``.
    nullable : bool
        ``None`` is a legal value, shown as ``null_label`` (``"per row"``, ``"fp16"``).
    scope : {"both", "tensor", "plan", "json"}
        Where a widget offers it: ``tensor`` needs a tensor shape (an absolute rank), ``plan`` is
        per component (a rank fraction), ``json`` nowhere (an expert setting); the CLI and plan JSON
        accept every parameter.
    options : callable, optional
        ``options(shape) -> list`` of the values that fit a tensor of ``shape`` (divisors for a group
        size, ``1..min(m, n)`` for a rank); widgets offer these when a shape is known.
    default_for : callable, optional
        ``default_for(shape)``: the widget default for a tensor of ``shape``.
    aliases : tuple of str
        Extra CLI flags (``--tt-bits``).
    omit_if_none : bool
        Leave the key out of the plan JSON when the value is ``None`` (one of two exclusive
        parameters, like ``rank`` / ``rank_fraction``, or an automatic choice).
    unless : str, optional
        The default applies only when this other parameter is not given (``rank_fraction`` unless
        ``rank``).
    help : str
    """

    name: str
    kind: str
    default: Any = None
    field: str | None = None
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    nullable: bool = False
    null_label: str = "none"
    scope: str = "both"
    options: Callable[[tuple[int, ...]], list] | None = None
    default_for: Callable[[tuple[int, ...]], Any] | None = None
    aliases: tuple[str, ...] = ()
    omit_if_none: bool = False
    unless: str | None = None
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _PARAM_KINDS:
            raise ValueError(f"param kind must be one of {', '.join(_PARAM_KINDS)}, got {self.kind!r}.")
        if self.scope not in _SCOPES:
            raise ValueError(f"param scope must be one of {', '.join(_SCOPES)}, got {self.scope!r}.")

    @property
    def attr(self) -> str:
        """The config attribute this parameter sets."""
        return self.field or self.name

    def parse(self, text: str) -> Any:
        """A value from command-line text (``none`` / the null label for ``None``; ``0`` = per row
        for a nullable group size, as before)."""
        t = text.strip()
        flag = "--" + self.name.replace("_", "-")
        if self.nullable and t.lower() in {"none", "null", self.null_label.lower()}:
            return None
        if self.kind == "choice":
            for c in self.choices:
                if str(c).lower() == t.lower():
                    return c
            raise ValueError(f"{flag} takes one of {', '.join(str(c) for c in self.choices)}, got {text!r}.")
        try:
            if self.kind == "int":
                v = int(t)
                return None if (self.nullable and v == 0 and self.name == "group_size") else v
            if self.kind == "float":
                return float(t)
            return [int(x) for x in t.replace(";", ",").replace(" ", ",").split(",") if x]  # int_list
        except ValueError:
            what = {"int": "an integer", "float": "a number"}.get(self.kind, "integers like 1,64,64,1")
            raise ValueError(f"{flag} takes {what}{' or ' + repr(self.null_label) if self.nullable else ''}, "
                             f"got {text!r}.") from None

    def to_json(self) -> dict:
        """The schema entry ``methods --json`` prints."""
        d: dict[str, Any] = {"name": self.name, "type": self.kind, "default": self.default, "nullable": self.nullable,
                             "scope": self.scope}
        if self.nullable:
            d["null_label"] = self.null_label
        if self.choices:
            d["choices"] = list(self.choices)
        if self.min is not None:
            d["min"] = self.min
        if self.max is not None:
            d["max"] = self.max
        if self.help:
            d["help"] = self.help
        return d


def config_to_dict(cfg: Any) -> dict:
    """Plan-JSON form ``{"method": name, key: value, ...}``; inverse of :func:`config_from_dict`."""
    from sahc_core.methods.registry import spec_of

    spec = spec_of(cfg)
    out: dict[str, Any] = {"method": spec.name}
    for p in spec.params:
        v = getattr(cfg, p.attr)
        if v is None and p.omit_if_none:
            continue
        out[p.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_from_dict(d: Mapping[str, Any]) -> Any:
    """Parse the plan JSON form, e.g. ``{"method": "int", "bits": 4, "group_size": 128}``.

    Missing keys take the config's defaults; an unknown method or key raises ``ValueError``.
    """
    if not isinstance(d, Mapping) or "method" not in d:
        raise ValueError(f"a method config must be a dict with a 'method' key, got {d!r}.")
    from sahc_core.methods.registry import get

    spec = get(d["method"])
    extra = sorted(set(d) - {"method"} - set(spec.keys))
    if extra:
        raise ValueError(f"unknown key(s) {extra} for method {spec.name!r}; allowed: {sorted(spec.keys)}.")
    kwargs = {spec.param(k).attr: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "method"}
    try:
        return spec.config(**kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid {spec.name!r} config {dict(d)}: {exc}.") from exc


def config_from_values(name: str, values: Mapping[str, Any], fill_defaults: bool = True) -> Any:
    """A config from parameter values by plan key (CLI flags, widgets).

    Keys the method does not take are ignored (flags are shared between methods). A parameter that
    is absent takes its schema default (``fill_defaults``), unless its ``unless`` partner is given.
    """
    from sahc_core.methods.registry import get

    spec = get(name)
    given = {p.name for p in spec.params if p.name in values}
    d: dict[str, Any] = {"method": name}
    for p in spec.params:
        if p.name in values:
            d[p.name] = values[p.name]
        elif fill_defaults and p.default is not None and not (p.unless and p.unless in given):
            d[p.name] = p.default
    return config_from_dict(d)
