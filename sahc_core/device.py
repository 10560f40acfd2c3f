"""Device selection shared by every torch computation (GPU when there is one, else CPU)."""
from __future__ import annotations

import torch


def device_choices() -> list[str]:
    """The devices a picker offers: ``auto``, ``cpu`` and, with a CUDA GPU, ``cuda``."""
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def resolve_device(device: str = "auto") -> str:
    """Return a concrete torch device string for ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``"auto"`` picks ``"cuda"`` when a CUDA device is available, else ``"cpu"``.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu or auto.")
        return device
    raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda.")
