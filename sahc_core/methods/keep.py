"""``keep``: the tensor stored as it is in 16-bit (bfloat16 or float16), 2 bytes per weight."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sahc_core.methods.registry import MethodSpec, Param, config_to_dict, register

_KEEP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KeepConfig:
    """Keep the tensor in 16-bit (``"bfloat16"`` or ``"float16"``): 2 bytes per weight."""

    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.dtype not in _KEEP_DTYPES:
            raise ValueError(f"keep dtype must be 'bfloat16' or 'float16', got {self.dtype!r}.")


@dataclass(frozen=True, eq=False)
class KeptTensor:
    """A tensor stored as is in 16-bit."""

    shape: tuple[int, ...]
    config: KeepConfig
    weight: Tensor

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype)

    def state(self) -> dict[str, Tensor]:
        return {"weight": self.weight}

    def meta(self) -> dict:
        return {"method": "keep", "config": config_to_dict(self.config), "shape": list(self.shape)}

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def keep(W: Tensor, cfg: KeepConfig, calib: object = None) -> KeptTensor:
    """``W`` in the 16-bit dtype of ``cfg`` (refuses a float16 overflow rather than storing inf)."""
    w = W.detach().to(_KEEP_DTYPES[cfg.dtype]).contiguous()
    if cfg.dtype == "float16" and torch.isinf(w).any() and not torch.isinf(W).any():
        raise ValueError("the tensor overflows float16 (values beyond about 6.5e4); keep it as bfloat16.")
    return KeptTensor(tuple(W.shape), cfg, w)


def keep_bytes(shape: tuple[int, ...], cfg: KeepConfig) -> int:
    """2 bytes per weight."""
    return 2 * math.prod(shape)


def _load(state: dict[str, Tensor], meta: dict, cfg: KeepConfig) -> KeptTensor:
    shape = tuple(meta["shape"])
    w = state.get("weight")
    if set(state) != {"weight"} or w is None or tuple(w.shape) != shape or w.dtype != _KEEP_DTYPES[cfg.dtype]:
        raise ValueError(f"a kept tensor's state must be one {cfg.dtype} 'weight' of shape {shape}.")
    return KeptTensor(shape, cfg, w)


SPEC = register(MethodSpec(
    name="keep", title="16-bit (kept)", config=KeepConfig, compress=keep, nbytes=keep_bytes, load=_load,
    params=(Param("dtype", "choice", "bfloat16", choices=("bfloat16", "float16"), help="16-bit storage dtype"),),
    label=lambda c: "16-bit" if c.dtype == "bfloat16" else "float16",
    candidates=lambda shape, component: [KeepConfig()], row_separable=True, storage="16-bit",
    color="#999999", description="No compression: the reference point of every ratio (2 bytes per weight)."))
