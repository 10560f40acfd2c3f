"""Agreement metrics between a layer's outputs with W and with Ŵ (float64 cosines)."""
from __future__ import annotations

import torch
from torch import Tensor


def row_cosines(Y: Tensor, Y_hat: Tensor) -> Tensor:
    """cos(y_n, ŷ_n) of every row in float64; two zero rows count 1, one zero row counts 0."""
    Y, Y_hat = Y.double(), Y_hat.double()
    dot = (Y * Y_hat).sum(-1)
    norms = Y.norm(dim=-1) * Y_hat.norm(dim=-1)
    both_zero = (Y.norm(dim=-1) == 0) & (Y_hat.norm(dim=-1) == 0)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny), both_zero.double())


def _row_cosine(Y: Tensor, Y_hat: Tensor) -> float:
    """Mean over rows of :func:`row_cosines`."""
    return float(row_cosines(Y, Y_hat).mean())


def output_cosine(W: Tensor, W_hat: Tensor, X: Tensor) -> float:
    """Mean over the rows of ``X`` of ``cos(X W^T, X Ŵ^T)`` (layer outputs with W vs with Ŵ).

    Parameters
    ----------
    W, W_hat : Tensor
        ``(out_features, in_features)`` weights.
    X : Tensor
        ``(N, in_features)`` activations (see :func:`capture_inputs`).
    """
    if W.shape != W_hat.shape or W.dim() != 2:
        raise ValueError(f"W and W_hat must be matrices of one shape, got {tuple(W.shape)} and {tuple(W_hat.shape)}.")
    if X.dim() != 2 or X.shape[1] != W.shape[1]:
        raise ValueError(f"X must be (N, {W.shape[1]}), got {tuple(X.shape)}.")
    # float32 matmuls on W's device (fast on GPU); the cosine itself in float64
    X = X.to(W.device, torch.float32)
    return _row_cosine(X @ W.float().T, X @ W_hat.to(W.device).float().T)
