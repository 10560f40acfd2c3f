"""Widgets generated from the method registry's parameter schemas (What-if and Budget pages).

No page names a method: the method list comes from ``registry.methods()`` and each parameter's widget
from its :class:`~sahc_core.methods.registry.Param` (kind, range, choices, nullability, the values
that fit a tensor's shape). A new registered method appears on both pages with no page edit.
"""
from __future__ import annotations

from typing import Any

import streamlit as st

from sahc_core.methods import registry
from sahc_core.methods.registry import MethodSpec, Param

#: A shape-dependent option list longer than this is offered as a plain slider (e.g. ranks 1..4096).
_MAX_SELECT_OPTIONS = 32


def offered_methods(component: str | None, shape: tuple[int, ...] | None, with_calibration: bool) -> list[MethodSpec]:
    """Registered methods that may take this component / shape; calibration-aware ones only when
    statistics are available (otherwise they are listed as unavailable by the caller)."""
    dims = shape if shape is not None else (2, 2)
    return [m for m in registry.methods()
            if registry.applicable(m, dims, component) and (with_calibration or not m.needs_calibration)]


def _fmt(p: Param):
    return lambda v: p.null_label if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _nearest(options: list, value: Any) -> Any:
    """``value`` if offered, else the closest offered number (or the first option)."""
    if value in options:
        return value
    nums = [o for o in options if isinstance(o, (int, float))]
    if value is None or not nums:
        return options[0]
    return min(nums, key=lambda o: abs(o - value))


def _options(p: Param, shape: tuple[int, ...] | None) -> list | None:
    if shape is not None and p.options is not None:
        return list(p.options(shape))
    if p.choices:
        return list(p.choices) + ([None] if p.nullable else [])
    return None


def _start(key: str, name: str, value: Any) -> dict:
    """The initial-value keyword, left out once the widget's key holds a value (set by a loaded plan or
    an earlier run): Streamlit warns when a widget gets both."""
    return {} if key in st.session_state else {name: value}


def param_widget(box: Any, p: Param, key: str, shape: tuple[int, ...] | None, compact: bool = False) -> Any:
    """One parameter's widget in ``box`` (a column or the page); returns the chosen value."""
    label = p.name.replace("_", " ")
    default = p.default_for(shape) if (shape is not None and p.default_for is not None) else p.default
    opts = _options(p, shape)
    if p.kind == "choice":
        choices = list(p.choices)
        widget = box.selectbox if compact else box.radio
        extra = {} if compact else {"horizontal": True}
        return widget(label, choices, key=key, help=p.help, **extra, **_start(key, "index", choices.index(p.default)))
    if p.kind == "int_list":
        if opts:  # one select slider per inner value (TT ranks: 1, r1, ..., 1)
            inner = list(default)[1:-1]
            vals = [box.select_slider(f"{label} r{i + 1}", opts, key=f"{key}_{i}", help=p.help,
                                      **_start(f"{key}_{i}", "value", _nearest(opts, v)))
                    for i, v in enumerate(inner)]
            return [1, *vals, 1]
        text = box.text_input(label, key=key, help=p.help,
                              **_start(key, "value", ", ".join(str(v) for v in (default or []))))
        return p.parse(text) if text.strip() else None
    if opts is not None:
        numeric = [o for o in opts if o is not None]
        if len(opts) > _MAX_SELECT_OPTIONS and numeric == list(range(numeric[0], numeric[-1] + 1)):
            return box.slider(label, numeric[0], numeric[-1], key=key, help=p.help,
                              **_start(key, "value", int(_nearest(numeric, default))))
        if key in st.session_state and st.session_state[key] not in opts:  # a loaded value outside the options
            opts = [*opts[:-1], st.session_state[key], opts[-1]] if opts[-1] is None else [*opts, st.session_state[key]]
        if compact:
            return box.selectbox(label, opts, key=key, format_func=_fmt(p), help=p.help,
                                 **_start(key, "index", opts.index(_nearest(opts, default))))
        return box.select_slider(label, opts, key=key, format_func=_fmt(p), help=p.help,
                                 **_start(key, "value", _nearest(opts, default)))
    if p.kind == "float":
        lo, hi = float(p.min if p.min is not None else 0.0), float(p.max if p.max is not None else 1.0)
        return box.slider(label, max(lo, 0.01) if lo == 0 else lo, hi, step=0.01, key=key, help=p.help,
                          **_start(key, "value", float(default)))
    lo, hi = int(p.min if p.min is not None else 0), int(p.max if p.max is not None else 1 << 20)
    value = int(default if default is not None else lo)
    if hi - lo <= _MAX_SELECT_OPTIONS and not compact:  # a short range (bits 2..8): a slider
        return box.slider(label, lo, hi, key=key, help=p.help, **_start(key, "value", value))
    return box.number_input(label, lo, hi, key=key, help=p.help, **_start(key, "value", value))


def config_ui(spec: MethodSpec, key_prefix: str, shape: tuple[int, ...] | None, scope: str,
              compact: bool = False, columns: int = 3) -> Any:
    """Widgets for every parameter of ``spec`` in ``scope`` ("tensor" or "plan"); returns the config.

    Widget keys are ``{key_prefix}_{method}_{param}`` (per method, so switching methods never feeds
    one method's value into another's widget), plus the shape for shape-dependent options.
    """
    shown = [p for p in spec.params if p.scope in ("both", scope)]
    cols = st.columns(max(1, min(columns, len(shown)))) if shown else []
    values = {p.name: param_widget(cols[i % len(cols)], p, _key(key_prefix, spec, p, shape), shape, compact)
              for i, p in enumerate(shown)}
    return registry.config_from_values(spec.name, values)


def _key(prefix: str, spec: MethodSpec, p: Param, shape: tuple[int, ...] | None) -> str:
    """Widget key; a parameter whose options depend on the shape gets the shape in its key (another
    tensor's options must not meet this tensor's stored value)."""
    key = f"{prefix}_{spec.name}_{p.name}"
    return key + "_" + "x".join(map(str, shape)) if shape is not None and p.options is not None else key


def set_config_widgets(key_prefix: str, cfg_dict: dict) -> None:
    """Copy a plan-JSON config into the widget state of its method (load a saved plan)."""
    spec = registry.get(cfg_dict["method"])
    for p in spec.params:
        if p.name not in cfg_dict:
            continue
        v = cfg_dict[p.name]
        if p.kind == "int_list" and v is not None and p.options is None:
            st.session_state[f"{key_prefix}_{spec.name}_{p.name}"] = ", ".join(str(x) for x in v)
        else:
            st.session_state[f"{key_prefix}_{spec.name}_{p.name}"] = v
