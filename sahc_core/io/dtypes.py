"""Every safetensors dtype: its storage width and whether SAHC analyses tensors stored in it.

SAHC's numbers (spectra, errors, bytes and ratios against a 16-bit original) are defined for
floating-point weights. Integer, boolean and 8-bit-or-narrower float tensors (``I8``/``U8`` codes of a
pre-quantized checkpoint, ``F8_E4M3`` weights that need their block scales, ``BOOL`` masks, ``I64``
position ids) would be meaningless if they were read as floats and compared with a 16-bit original,
so they are named as such and refused wherever a tensor is analysed or compressed.

The names are those of the safetensors format (``safetensors`` 0.8 ``Dtype``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DtypeInfo:
    """One safetensors dtype.

    Attributes
    ----------
    name : str
        The safetensors name (``"BF16"``).
    bits : int
        Storage bits per element (4 for ``F4``; 8 for ``BOOL``, stored as one byte).
    kind : str
        What it holds, in words (``"16-bit float"``).
    analysed : bool
        True for the floats SAHC analyses and compresses (F16, BF16, F32, F64).
    """

    name: str
    bits: int
    kind: str
    analysed: bool = False


_TABLE = (
    DtypeInfo("F64", 64, "64-bit float", True),
    DtypeInfo("F32", 32, "32-bit float", True),
    DtypeInfo("F16", 16, "16-bit float", True),
    DtypeInfo("BF16", 16, "16-bit bfloat", True),
    DtypeInfo("F8_E4M3", 8, "8-bit float (E4M3)"),
    DtypeInfo("F8_E5M2", 8, "8-bit float (E5M2)"),
    DtypeInfo("F8_E4M3FNUZ", 8, "8-bit float (E4M3, FNUZ)"),
    DtypeInfo("F8_E5M2FNUZ", 8, "8-bit float (E5M2, FNUZ)"),
    DtypeInfo("F8_E8M0", 8, "8-bit exponent-only scale (E8M0)"),
    DtypeInfo("F6_E2M3", 6, "6-bit float (E2M3)"),
    DtypeInfo("F6_E3M2", 6, "6-bit float (E3M2)"),
    DtypeInfo("F4", 4, "4-bit float"),
    DtypeInfo("C64", 64, "64-bit complex"),
    DtypeInfo("I64", 64, "64-bit integer"),
    DtypeInfo("U64", 64, "64-bit unsigned integer"),
    DtypeInfo("I32", 32, "32-bit integer"),
    DtypeInfo("U32", 32, "32-bit unsigned integer"),
    DtypeInfo("I16", 16, "16-bit integer"),
    DtypeInfo("U16", 16, "16-bit unsigned integer"),
    DtypeInfo("I8", 8, "8-bit integer"),
    DtypeInfo("U8", 8, "8-bit unsigned integer"),
    DtypeInfo("BOOL", 8, "boolean"),
)
#: safetensors dtype name -> :class:`DtypeInfo`.
DTYPES: dict[str, DtypeInfo] = {d.name: d for d in _TABLE}


def dtype_info(name: str) -> DtypeInfo:
    """The table entry of ``name``; a dtype this table does not know is reported as not analysed."""
    return DTYPES.get(name) or DtypeInfo(name, 0, "unknown dtype")


def is_analysed(name: str) -> bool:
    """True when tensors stored as ``name`` are floats SAHC analyses and compresses."""
    return dtype_info(name).analysed


def not_analysed_reason(tensor: str, dtype: str) -> str:
    """One sentence naming why ``tensor`` (stored as ``dtype``) is not analysed, and what to do."""
    return (f"tensor {tensor} is stored as {dtype} ({dtype_info(dtype).kind}), not as a 16/32/64-bit float, so it "
            "cannot be analysed or compressed as a weight; use a checkpoint with float weights (dequantize it first)")
