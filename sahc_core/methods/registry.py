"""The method registry: one :class:`MethodSpec` per compression method drives every surface.

A method is one module that calls :func:`register` with its spec (torchao-style): the frozen config
type, the plan-JSON name, ``compress`` / exact ``nbytes`` / ``load``, a label, its parameters
(:class:`Param`: type, range, default, nullability: the schema from which the CLI flags, the
What-if and Budget widgets and plan validation are generated), the components it may apply to,
whether it needs calibration statistics, and optionally a fast ``measure`` path (a slider move),
the settings a Pareto sweep / the optimizer should try (``candidates``) and how to make a config fit
a shape (``adapt``, e.g. a group size that does not divide the width). Nothing else in the code base
names a method: the CLI ``--method`` choices, the What-if list, the Budget choices, sweeps, plans and
assembly all read :func:`methods`.

The built-in methods (``keep``, ``int``, ``svd``, ``tt`` and the calibration-aware ones) live in
their own modules and register when the registry is first used (:func:`_builtins`), so importing
this module does nothing.

Verbs (dispatch on the config's type, never on strings): :func:`compress`, :func:`projected_bytes`
(formula, equal to ``compress(W, cfg).nbytes`` exactly), :func:`load_compressed`,
:func:`config_from_dict` / :func:`config_to_dict` (plan JSON), :func:`measure`, :func:`label`,
:func:`incompatibility`, :func:`fit_to_shape`.

:class:`Param` and the plan-JSON / CLI conversions (``config_from_dict``, ``config_to_dict``,
``config_from_values``) live in :mod:`sahc_core.methods._params` and are re-exported here.
"""
from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from sahc_core import metrics
from sahc_core.errors import SahcError
from sahc_core.methods._params import (Param, config_from_dict, config_from_values,  # noqa: F401  (public here)
                                       config_to_dict)

#: Modules of the built-in methods, imported (and so registered) on first use of the registry.
BUILTIN_MODULES = ("rtn", "hqq", "gptq", "svd", "wsvd", "tt", "keep")


class CalibrationRequired(SahcError):
    """A calibration-aware method was asked to compress without calibration statistics."""


@runtime_checkable
class Compressed(Protocol):
    """What every method returns: reconstruct, the tensors to store, a JSON meta and exact bytes."""

    shape: tuple[int, ...]

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> Tensor: ...

    def state(self) -> dict[str, Tensor]: ...

    def meta(self) -> dict: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True, eq=False)
class Tagged:
    """A compressed tensor stored in another method's format, labelled with its own method and config.

    GPTQ and HQQ store exactly RTN's codes, scales and zeros, whitened SVD exactly plain SVD's
    factors: ``Tagged`` keeps their storage (``state``, ``nbytes``, ``reconstruct``) and makes
    ``meta()`` name the method that produced it, so a checkpoint's manifest says "gptq" and reloads
    through the gptq spec.
    """

    inner: Any
    method: str
    config: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inner.shape

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.inner.reconstruct(dtype)

    def state(self) -> dict[str, Tensor]:
        return self.inner.state()

    def meta(self) -> dict:
        return {**self.inner.meta(), "method": self.method, "config": config_to_dict(self.config)}

    @property
    def nbytes(self) -> int:
        return int(self.inner.nbytes)

    def __getattr__(self, name: str) -> Any:  # scales, rank, u_f32, ... of the stored format
        if name in ("inner", "method", "config"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def _no_extras(W: Tensor, c: Any, W_hat: Tensor) -> dict:
    return {}


@dataclass(frozen=True)
class MethodSpec:
    """Everything the product needs to know about one method (see the module docstring).

    ``compress(W, cfg, calib)`` receives the layer's calibration statistics (``calib``: an object
    with ``xtx`` (n, n) float64 and ``n_tokens``, or ``None``); ``measure(W, cfg, ctx)`` (optional
    fast path) returns at least :func:`measure`'s base keys; ``extras(W, compressed, W_hat)`` adds
    method keys to :func:`measure`; ``candidates(shape, component)`` lists configs to sweep;
    ``adapt(shape, cfg)`` returns ``(cfg', note)`` making ``cfg`` fit ``shape`` or ``None``;
    ``compress_in(ctx, cfg)`` compresses the context's tensor re-using what the context caches (the
    SVD re-uses the tensor's thin SVD instead of computing it again).

    Tensors above ``io.rows.BOUNDED_MIN_BYTES`` (the 248k embedding) are measured without float32
    copies of W (:mod:`sahc_core.methods._bounded`): ``measure_bounded(W, cfg, ctx)`` gets W in its
    stored dtype; without one, a ``row_separable`` method (``compress(W)[rows] == compress(W[rows])``)
    is compressed and compared block by block, and any other method is refused with the memory bound.
    """

    name: str
    title: str
    config: type
    compress: Callable[[Tensor, Any, Any], Any]
    nbytes: Callable[[tuple[int, ...], Any], int]
    load: Callable[[dict, dict, Any], Any]
    params: tuple[Param, ...]
    label: Callable[[Any], str]
    components: frozenset[str] | None = None
    min_ndim: int = 1
    needs_calibration: bool = False
    measure: Callable[..., dict] | None = None
    extras: Callable[[Tensor, Any, Tensor], dict] = _no_extras
    candidates: Callable[[tuple[int, ...], str | None], list] | None = None
    adapt: Callable[[tuple[int, ...], Any], tuple[Any, str] | None] | None = None
    compress_in: Callable[[Any, Any], Any] | None = None
    measure_bounded: Callable[..., dict] | None = None
    row_separable: bool = False
    #: How a compressed tensor is stored, for exporters to serving formats: ``"int-k"`` (a
    #: :class:`~sahc_core.methods.quant.QuantizedTensor`: codes + fp16 scales, zeros; compressed-tensors
    #: and GGUF can pack it), ``"16-bit"`` (the tensor itself, ``.weight``) or ``"other"`` (exported dense).
    storage: str = "other"
    color: str = "#888888"
    description: str = ""

    def param(self, name: str) -> Param:
        """The parameter named ``name`` (plan key)."""
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(f"method {self.name!r} has no parameter {name!r}; it takes {', '.join(self.keys)}.")

    @property
    def keys(self) -> tuple[str, ...]:
        """Plan-JSON keys it accepts (besides ``method``)."""
        return tuple(p.name for p in self.params)

    def to_json(self) -> dict:
        """The ``methods --json`` entry."""
        return {"name": self.name, "title": self.title, "params": [p.to_json() for p in self.params],
                "needs_calibration": self.needs_calibration,
                "components": None if self.components is None else sorted(self.components),
                "min_ndim": self.min_ndim, "description": self.description}


_BY_NAME: dict[str, MethodSpec] = {}
_BY_TYPE: dict[type, MethodSpec] = {}
_LOCK = threading.RLock()
_LOADED = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` (a new name and config type); returns it, so it can be used at module level."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register() takes a MethodSpec, got {type(spec).__name__}.")
    cfg_fields = {f.name for f in fields(spec.config)}
    missing = [p.attr for p in spec.params if p.attr not in cfg_fields]
    if missing:
        raise ValueError(f"method {spec.name!r}: parameter field(s) {missing} are not fields of {spec.config.__name__}.")
    with _LOCK:
        if spec.name in _BY_NAME and _BY_NAME[spec.name] is not spec:
            raise ValueError(f"a method named {spec.name!r} is registered already.")
        if spec.config in _BY_TYPE and _BY_TYPE[spec.config] is not spec:
            raise ValueError(f"config type {spec.config.__name__} is registered already (method "
                             f"{_BY_TYPE[spec.config].name!r}).")
        _BY_NAME[spec.name] = spec
        _BY_TYPE[spec.config] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    with _LOCK:
        spec = _BY_NAME.pop(name, None)
        if spec is not None:
            _BY_TYPE.pop(spec.config, None)


def _builtins() -> None:
    """Import the built-in method modules once (each registers its spec); idempotent, thread-safe."""
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if not _LOADED:
            for mod in BUILTIN_MODULES:
                importlib.import_module(f"sahc_core.methods.{mod}")
            _LOADED = True


def methods() -> list[MethodSpec]:
    """Every registered method: the built-ins in ``BUILTIN_MODULES`` order (whatever imported them
    first), then plug-ins in registration order."""
    _builtins()
    order = {f"sahc_core.methods.{m}": i for i, m in enumerate(BUILTIN_MODULES)}
    specs = list(_BY_NAME.values())
    return sorted(specs, key=lambda s: (order.get(s.compress.__module__, order.get(s.config.__module__, len(order))),
                                        specs.index(s)))


def names() -> list[str]:
    """Plan-JSON names of every registered method."""
    return [m.name for m in methods()]


def get(name: Any) -> MethodSpec:
    """The spec of the method called ``name``; a ``ValueError`` lists the known ones."""
    _builtins()
    spec = _BY_NAME.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown compression method {name!r}; use one of {', '.join(map(repr, _BY_NAME))}.")
    return spec


def spec_of(cfg: Any) -> MethodSpec:
    """The spec whose config type ``cfg`` is."""
    _builtins()
    spec = _BY_TYPE.get(type(cfg))
    if spec is None:
        raise ValueError(f"unknown compression config {type(cfg).__name__}; use one of "
                         f"{', '.join(t.__name__ for t in _BY_TYPE)}.")
    return spec


def applicable(spec: MethodSpec, shape: Sequence[int], component: str | None) -> bool:
    """True when the method may take a tensor of this shape and component (its declared scope)."""
    return len(shape) >= spec.min_ndim and (spec.components is None or component is None or component in spec.components)


# -------------------------------------------------------------------------------------- verbs
def compress(W: Tensor, cfg: Any, calib: Any = None) -> Compressed:
    """Compress ``W`` with the method of ``type(cfg)``; ``calib`` = the layer's statistics, if any."""
    spec = spec_of(cfg)
    if spec.needs_calibration and calib is None:
        raise CalibrationRequired(
            f"method {spec.name!r} needs calibration statistics of the layer's inputs (XᵀX); capture them with "
            "`python -m sahc_core calib` (or tick calibration on the page) and try again.")
    return spec.compress(W, cfg, calib)


def projected_bytes(shape: Sequence[int], cfg: Any) -> int:
    """Exact stored bytes of ``compress(W, cfg)`` for a tensor of ``shape``, from the formula alone."""
    return int(spec_of(cfg).nbytes(tuple(int(s) for s in shape), cfg))


def label(cfg: Any) -> str:
    """A short human label (``int4-g128``, ``svd r256 int4-g128``)."""
    return spec_of(cfg).label(cfg)


def load_compressed(state: dict[str, Tensor], meta: dict) -> Compressed:
    """Rebuild a compressed tensor from its stored ``state()`` tensors and ``meta()`` dict."""
    if not isinstance(meta, dict) or "config" not in meta or "shape" not in meta:
        raise ValueError("compressed meta must be a dict with 'method', 'config' and 'shape'.")
    cfg = config_from_dict(meta["config"])
    return spec_of(cfg).load(state, meta, cfg)


def incompatibility(shape: Sequence[int], component: str | None, cfg: Any) -> str | None:
    """Why ``cfg`` cannot take a tensor of ``shape`` in ``component`` (``None`` when it can)."""
    spec = spec_of(cfg)
    shape = tuple(int(s) for s in shape)
    if len(shape) < spec.min_ndim:
        return f"{spec.title} needs a {spec.min_ndim}-D tensor, not shape {shape}"
    if spec.components is not None and component is not None and component not in spec.components:
        return f"{spec.title} is for the {'/'.join(sorted(spec.components))} component only, not a {component} tensor"
    try:
        spec.nbytes(shape, cfg)
    except ValueError as exc:
        return str(exc).rstrip(".")
    return None


def fit_to_shape(shape: Sequence[int], component: str | None, cfg: Any) -> tuple[Any, str | None]:
    """``(cfg, None)`` when ``cfg`` fits; else the method's adapted config and a note saying what
    changed (e.g. a group size that does not divide the width); ``ValueError`` when it cannot fit."""
    shape = tuple(int(s) for s in shape)
    why = incompatibility(shape, component, cfg)
    if why is None:
        return cfg, None
    spec = spec_of(cfg)
    adapted = spec.adapt(shape, cfg) if spec.adapt is not None else None
    if adapted is not None and incompatibility(shape, component, adapted[0]) is None:
        return adapted
    raise ValueError(why + ".")


def measure(W: Tensor, cfg: Any, *, compressed: Compressed | None = None, w_hat: Tensor | None = None,
            calib: Any = None) -> dict:
    """Compress ``W`` (or use ``compressed``, made from ``W`` with ``cfg``) and report its numbers.

    ``w_hat``, when given, must be ``compressed.reconstruct(torch.float32)`` (saves rebuilding it).
    With ``calib`` (statistics with ``xtx``), ``output_error`` is added (trace form, see
    :func:`sahc_core.metrics.output_error`).

    Returns
    -------
    dict
        ``method``, ``bytes``, ``ratio`` (vs 2 bytes per weight), ``bits_per_weight``, ``rel_error``,
        ``weight_cosine``, plus method-specific keys (int: ``predicted_error``; svd: ``rank``,
        ``trunc_error``, ``quant_error``, ``eym_error``, ``predicted_error``; tt: ``tt_shape``,
        ``predicted_error``; a ``prediction`` names the basis of each ``predicted_error``).
    """
    spec = spec_of(cfg)
    c = compressed if compressed is not None else compress(W, cfg, calib)
    W_hat = w_hat if w_hat is not None and compressed is not None else c.reconstruct(torch.float32)
    out = base_numbers(spec.name, W, int(c.nbytes), *metrics.compare(W, W_hat))
    out.update(spec.extras(W, c, W_hat))
    if calib is not None and W.ndim == 2:
        out["output_error"] = metrics.output_error(W, W_hat.reshape(W.shape), calib.xtx)
    return out


def base_numbers(method: str, W: Tensor, nbytes: int, rel_error: float, weight_cosine: float) -> dict:
    """The keys every measurement has (bytes, ratio vs 16-bit, bits per weight, error, cosine)."""
    numel = W.numel()
    return {"method": method, "bytes": int(nbytes), "ratio": 2 * numel / nbytes if nbytes else math.inf,
            "bits_per_weight": 8 * nbytes / numel, "rel_error": rel_error, "weight_cosine": weight_cosine}


def float32_measure(W: Tensor, cfg: Any, ctx: Any) -> dict:
    """The default fast measurement of any method (TT, keep, calibration methods, plug-ins).

    ``ctx.compress(cfg)`` (cached, so an output cosine afterwards reuses it) is rebuilt once in
    float32 and compared row by row (float32 passes, float64 sums): about 3x faster than
    :func:`measure`'s float64 casts on the 49152x576 embedding, equal to float32 rounding (tested).
    """
    spec = spec_of(cfg)
    c = ctx.compress(cfg)
    W_hat = c.reconstruct(torch.float32).reshape(W.shape)
    x, xh = metrics.rows(W), metrics.rows(W_hat)
    out = base_numbers(spec.name, W, int(c.nbytes),
                       *metrics.from_row_norms(ctx.w_row2, metrics.row_norm2(xh), metrics.row_norm2(x - xh)))
    out.update(spec.extras(W, c, W_hat))
    if ctx.calib is not None and W.ndim == 2:
        out["output_error"] = metrics.output_error(W, W_hat, ctx.xtx())
    return out


def schema() -> list[dict]:
    """Every method with its parameter schema (``python -m sahc_core methods --json``)."""
    return [m.to_json() for m in methods()]


def quant_config_of(cfg: Any) -> Any:
    """The :class:`~sahc_core.methods.quant.QuantConfig` (bits, group size, scheme) of an ``"int-k"``
    method's config (RTN's config is one; GPTQ's and HQQ's carry one as ``.quant``)."""
    return getattr(cfg, "quant", cfg)
