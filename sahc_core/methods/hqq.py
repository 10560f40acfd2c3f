"""``hqq``: int-k (asym) with the zero point optimised by half-quadratic splitting (registry entry).

The solver is :mod:`sahc_core.methods._hqq` (Badri & Shaji 2023), written here rather than called from
the ``hqq`` package so every iterate uses our fp16 scale and zero (iteration 0 is RTN bit for bit)
and the embedding takes seconds instead of a minute on CPU; it stores exactly RTN's asym format.
Calibration-free.
"""
from __future__ import annotations

from dataclasses import dataclass

from sahc_core.methods._hqq import hqq_quantize
from sahc_core.methods.quant import QuantConfig, QuantizedTensor, quant_bytes
from sahc_core.methods.registry import MethodSpec, Param, Tagged, register
from sahc_core.methods.rtn import SWEEP_GROUPS, _extras as _rtn_extras, adapt_group, int_params


@dataclass(frozen=True)
class HQQConfig:
    """HQQ settings: bits and group size of RTN asym storage, and the solver's parameters."""

    bits: int = 4
    group_size: int | None = 64
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def __post_init__(self) -> None:
        self.quant  # validates bits / group_size
        from sahc_core.methods._hqq import _check_params

        _check_params(self.quant, self.iters, self.lp_norm, self.beta, self.kappa)

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.bits, self.group_size, "asym")


def _compress(W, cfg: HQQConfig, calib=None) -> Tagged:
    q = hqq_quantize(W, cfg.quant, iters=cfg.iters, lp_norm=cfg.lp_norm, beta=cfg.beta, kappa=cfg.kappa)
    return Tagged(q, "hqq", cfg)


def _load(state, meta, cfg: HQQConfig) -> Tagged:
    return Tagged(QuantizedTensor.from_state(state, tuple(meta["shape"]), cfg.quant), "hqq", cfg)


def _label(cfg: HQQConfig) -> str:
    return f"hqq{cfg.bits}-" + ("row" if cfg.group_size is None else f"g{cfg.group_size}")


SPEC = register(MethodSpec(
    name="hqq", title="HQQ int-k", config=HQQConfig, compress=_compress,
    nbytes=lambda shape, cfg: quant_bytes(shape, cfg.quant), load=_load,
    params=(
        *int_params(group_size=64),
        Param("iters", "int", 20, min=0, max=200, scope="json", help="zero-point updates per group (0 = RTN)"),
        Param("lp_norm", "float", 0.7, min=0.0, max=1.0, scope="json", help="p of the lp error norm"),
        Param("beta", "float", 10.0, min=0.0, max=1e6, scope="json"),
        Param("kappa", "float", 1.01, min=1.0, max=10.0, scope="json"),
    ),
    label=_label, extras=lambda W, c, W_hat: _rtn_extras(W, c.inner, W_hat), row_separable=True, storage="int-k",
    candidates=lambda shape, component: [HQQConfig(b, g) for b in (2, 3, 4, 8) for g in SWEEP_GROUPS
                                         if g is None or int(shape[-1]) % g == 0],
    adapt=lambda shape, cfg: adapt_group(int(shape[-1]), cfg), color="#72B7B2",
    description="HQQ (Badri & Shaji 2023): min-max int-k whose zero points are optimised by half-quadratic "
                "splitting with an lp error; calibration-free; RTN asym storage and bytes."))
