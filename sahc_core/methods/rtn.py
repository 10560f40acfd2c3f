"""``int``: round-to-nearest int-k quantization (k = 2..8), per row or per group, sym or asym.

The storage format and the exact byte formula are :mod:`sahc_core.methods.quant`'s. This module is
the registry entry: parameters, labels, the group-size fallback, the rounding-noise prediction of
the error and the fast what-if measurement.

Group-size fallback (:func:`adapt`): a requested group size ``g`` that does not divide the width
``n`` becomes the largest divisor ``d`` of ``n`` with ``g/2 <= d < g`` (576 wide: 128 -> 96), and
per row when there is none (a 4-wide conv kernel, a 4,304-wide vision projection with 128: its
divisors below 128 stop at 16, where the fp16 scales and zeros would cost 2 bits per weight). The
result records ``group_size_requested``, ``group_size`` and a note.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sahc_core import metrics
from sahc_core.methods._bounded import quad_form, row_norm2_blocked
from sahc_core.methods.quant import QuantConfig, QuantizedTensor, fake_quant_chunks, quant_bytes, quantize
from sahc_core.methods.registry import MethodSpec, Param, base_numbers, register

#: Group sizes a Pareto sweep (and the optimizer) tries; ``None`` = per row.
SWEEP_GROUPS = (32, 64, 128, None)
#: Group sizes a per-component plan widget offers (any tensor they do not divide falls back, see adapt).
PLAN_GROUPS = (32, 64, 128, 256)
#: Largest group size a widget offers.
_MAX_WIDGET_GROUP = 256


def group_options(n: int) -> list:
    """Group sizes that divide ``n`` (multiples of 16 up to 256, or ``n`` itself when small), then per row."""
    opts = [g for g in range(16, _MAX_WIDGET_GROUP + 1, 16) if n % g == 0]
    if n <= _MAX_WIDGET_GROUP and n not in opts:
        opts.append(n)
    return sorted(opts) + [None]


def divisor_fallback(n: int, g: int) -> int | None:
    """The largest divisor ``d`` of ``n`` with ``g / 2 <= d <= g``, else ``None`` (per row)."""
    for d in range(min(g, n), 0, -1):
        if n % d == 0:
            return d if 2 * d >= g else None
    return None


def adapt_group(n: int, cfg: Any, what: str = "the width") -> tuple[Any, str] | None:
    """``cfg`` with its ``group_size`` replaced by :func:`divisor_fallback` (None when it already divides)."""
    g = getattr(cfg, "group_size", None)
    if g is None or n % g == 0:
        return None
    d = divisor_fallback(n, g)
    from dataclasses import replace

    note = (f"group size {g} does not divide {what} {n}; used {d}, the largest divisor within 2x below it"
            if d is not None else f"group size {g} does not divide {what} {n} and no divisor lies within 2x below it; "
            "quantized per row")
    return replace(cfg, group_size=d), note


def _label(cfg: QuantConfig) -> str:
    g = "row" if cfg.group_size is None else f"g{cfg.group_size}"
    return f"int{cfg.bits}-{g}" + ("-sym" if cfg.scheme == "sym" else "")


def predicted_error(per_group: int, step2: float, w2: float) -> dict:
    """Uniform rounding-noise model of RTN quantization: ``E‖e‖² = Σ_g n_g Δ_g² / 12``.

    ``Δ_g`` is the stored scale (grid step) of group g (``step2`` = Σ_g Δ_g², each group holding
    ``per_group`` weights); each error is uniform on [-Δ/2, Δ/2] when the weights are spread over many
    steps (Widrow & Kollár, *Quantization Noise*, 2008). Computed from the scales alone, never from
    the measured error, so the theory gate compares two independent numbers.
    """
    norm = math.sqrt(w2)
    pred = math.sqrt(per_group * step2 / 12.0) / norm if norm > 0 else 0.0
    return {"predicted_error": pred, "prediction": "uniform rounding noise sqrt(sum_g n_g step_g^2 / 12) / ||W||"}


def rounding_noise_var(x: Tensor, q: QuantConfig | None) -> Tensor:
    """Variance of each entry's storage rounding error, ``(rows, cols)`` float64 for the 2-D view of ``x``.

    ``q`` an int-k config: ``Δ_g² / 12`` with ``Δ_g`` the scale :func:`quantize` would store for the
    entry's group (the same :func:`quant._grid_params`, so bit-identical steps); ``q=None`` (fp16
    storage): ``ulp(x)² / 12``, the fp16 spacing at ``x`` (11 significant bits, subnormal spacing 2⁻²⁴),
    0 for an exact 0. The model behind every prediction of stored factors and cores (Widrow & Kollár 2008).
    """
    from sahc_core.methods.quant import _grid_params

    x2 = metrics.rows(x).to(torch.float32)
    if q is None:
        _, e = torch.frexp(x2)  # x = m 2^e, 0.5 <= |m| < 1: the fp16 spacing is 2^(e - 11)
        ulp = torch.ldexp(torch.ones_like(x2, dtype=torch.float64), (e - 11).clamp_min(-24))
        return torch.where(x2 == 0, torch.zeros_like(ulp), ulp.square() / 12.0)
    rows, cols = x2.shape
    g = cols if q.group_size is None else q.group_size
    scales, _ = _grid_params(x2.reshape(rows, cols // g, g), q)  # (rows, groups) fp16
    return (scales.double().square() / 12.0).repeat_interleave(g, dim=1)


def _extras(W: Tensor, c: QuantizedTensor, W_hat: Tensor) -> dict:
    """The rounding-noise prediction from the stored scales (the whole error is quantization error,
    so no separate ``quant_error``: it would repeat ``rel_error``)."""
    w2 = float(row_norm2_blocked(W.detach()).sum())  # in float32 blocks: W may be a stored bf16 embedding
    per_group = W.numel() // c.scales.numel()
    return predicted_error(per_group, float(c.scales.double().square().sum()), w2)


def fast_measure(W: Tensor, cfg: QuantConfig, ctx: Any) -> dict:
    """:func:`registry.measure` numbers of int-k quantization, block by block (a What-if slider move).

    Hand-written for speed: the dequantized weights come block by block from
    :func:`quant.fake_quant_chunks` (bit-identical to ``dequantize(quantize(W))``, without packing the
    codes) and their row norms are taken while each block is in cache; bytes from the exact formula.
    With calibration statistics the output error ``tr(E H Eᵀ)`` accumulates block by block too.
    ``W`` may stay in its stored dtype (a bounded measurement, :mod:`sahc_core.methods._bounded`): the
    chunks convert one block at a time, and ``ctx.w_row2`` holds its float32 row norms.
    """
    x = metrics.rows(W)
    h_row2 = torch.empty(x.shape[0], dtype=torch.float64, device=W.device)
    e_row2, step2, n_groups, eHe = torch.empty_like(h_row2), 0.0, 0, 0.0
    H = ctx.xtx() if ctx.calib is not None and W.ndim == 2 else None
    for c in fake_quant_chunks(x, cfg):
        h_row2[c.rows] = metrics.row_norm2(c.w_hat)
        E = c.w_hat.sub_(c.w)
        e_row2[c.rows] = metrics.row_norm2(E)
        if H is not None:
            eHe += quad_form(E, H, c.rows.start, c.rows.stop)
        step2 += float(c.scales.double().square().sum())
        n_groups += c.scales.numel()
    out = base_numbers("int", W, quant_bytes(tuple(W.shape), cfg), *metrics.from_row_norms(ctx.w_row2, h_row2, e_row2))
    out.update(predicted_error(W.numel() // n_groups, step2, float(ctx.w_row2.sum())))
    if H is not None:
        wHw = ctx.wHw()
        out["output_error"] = math.sqrt(max(eHe, 0.0) / wHw) if wHw > 0 else math.nan
    return out


def _candidates(shape: tuple[int, ...], component: str | None) -> list[QuantConfig]:
    n = int(shape[-1])
    return [QuantConfig(b, g) for b in range(2, 9) for g in SWEEP_GROUPS if g is None or n % g == 0]


def _group_default(shape: tuple[int, ...]) -> int | None:
    opts = group_options(int(shape[-1]))
    return max((g for g in opts[:-1] if g <= 128), default=None)


def int_params(group_size: int | None = 128) -> tuple[Param, Param]:
    """The ``bits`` and ``group_size`` parameters every int-k storage method shares (int, gptq, hqq)."""
    return (Param("bits", "int", 4, min=2, max=8, help="code width k"),
            Param("group_size", "int", group_size, min=1, nullable=True, null_label="per row", choices=PLAN_GROUPS,
                  options=lambda shape: group_options(int(shape[-1])), default_for=_group_default,
                  help="weights per fp16 scale along the input dimension; per row = one scale per row"))


SCHEME = Param("scheme", "choice", "asym", choices=("asym", "sym"),
               help="asym: min-max with an fp16 zero; sym: symmetric around 0")

SPEC = register(MethodSpec(
    name="int", title="int-k (RTN)", config=QuantConfig,
    compress=lambda W, cfg, calib=None: quantize(W, cfg), nbytes=quant_bytes,
    load=lambda state, meta, cfg: QuantizedTensor.from_state(state, tuple(meta["shape"]), cfg),
    params=(*int_params(), SCHEME),
    label=_label, measure=fast_measure, extras=_extras, candidates=_candidates, row_separable=True, storage="int-k",
    measure_bounded=fast_measure,
    adapt=lambda shape, cfg: adapt_group(int(shape[-1]), cfg),
    color="#4C78A8",
    description="Round-to-nearest int-k with fp16 scales (and zeros), per row or per group; no calibration."))
