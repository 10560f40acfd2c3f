"""``gptq``: int-k with GPTQ's inverse-Hessian error feedback from calibration XᵀX (registry entry).

The kernel is :mod:`sahc_core.methods._gptq` (Frantar et al. 2022, Algorithm 1 with lazy batch
updates); it stores exactly RTN's format, so bytes, storage and reload are ``int``'s and only the
codes differ. Needs the layer's calibration statistics (``calib.xtx``). No error prediction (so no
theory gate): the error feedback trades weight error for output error on purpose, which RTN's
rounding-noise model does not describe, and the whole error is ``rel_error`` (no ``quant_error``).
"""
from __future__ import annotations

from dataclasses import dataclass

from sahc_core.methods._gptq import gptq_quantize
from sahc_core.methods.quant import QuantConfig, QuantizedTensor, quant_bytes
from sahc_core.methods.registry import MethodSpec, Param, Tagged, register
from sahc_core.methods.rtn import SCHEME, SWEEP_GROUPS, adapt_group, int_params


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings: RTN's storage (bits, group_size, scheme) plus dampening, block size, act-order."""

    bits: int = 4
    group_size: int | None = 128
    scheme: str = "asym"
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        self.quant  # validates bits / group_size / scheme
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp <= 1):
            raise ValueError(f"damp must be a fraction of mean(diag H) in (0, 1], got {self.damp!r}.")
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}.")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be true or false, got {self.act_order!r}.")

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(self.bits, self.group_size, self.scheme)


def _compress(W, cfg: GPTQConfig, calib) -> Tagged:
    res = gptq_quantize(W.reshape(W.shape[0], -1), calib.xtx, cfg.quant, damp=cfg.damp, block_size=cfg.block_size,
                        act_order=cfg.act_order)
    return Tagged(res.quantized, "gptq", cfg)


def _load(state, meta, cfg: GPTQConfig) -> Tagged:
    return Tagged(QuantizedTensor.from_state(state, tuple(meta["shape"]), cfg.quant), "gptq", cfg)


def _label(cfg: GPTQConfig) -> str:
    g = "row" if cfg.group_size is None else f"g{cfg.group_size}"
    return f"gptq{cfg.bits}-{g}" + ("-sym" if cfg.scheme == "sym" else "") + ("-act" if cfg.act_order else "")


SPEC = register(MethodSpec(
    name="gptq", title="GPTQ int-k", config=GPTQConfig, compress=_compress,
    nbytes=lambda shape, cfg: quant_bytes(shape, cfg.quant), load=_load,
    params=(
        *int_params(), SCHEME,
        Param("damp", "float", 0.01, min=0.0, max=1.0, scope="plan",
              help="dampening added to diag(H), as a fraction of its mean"),
        Param("block_size", "int", 128, min=1, scope="json", help="columns per lazy batch update"),
        Param("act_order", "choice", False, choices=(False, True), scope="plan",
              help="process columns by decreasing diag(H) (static groups)"),
    ),
    label=_label, min_ndim=2, needs_calibration=True, row_separable=True, storage="int-k",
    candidates=lambda shape, component: [GPTQConfig(b, g) for b in (2, 3, 4, 8) for g in SWEEP_GROUPS
                                         if g is None or int(shape[-1]) % g == 0],
    adapt=lambda shape, cfg: adapt_group(int(shape[-1]), cfg), color="#B279A2",
    description="GPTQ (Frantar et al. 2022): int-k codes chosen column by column with inverse-Hessian error "
                "feedback from the layer's calibration inputs; RTN's storage and bytes."))
