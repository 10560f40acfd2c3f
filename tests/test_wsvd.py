"""Tests of sahc_core.methods._wsvd (SVD-LLM whitened SVD): the output error of rank r is the whitened
EYM curve, it beats plain SVD on correlated inputs, and it stores exactly like plain SVD."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sahc_core.methods._wsvd import (
    whitened_factors,
    whitened_lowrank,
    whitened_rank_error_curve,
    whitening,
)
from sahc_core.methods.lowrank import SVDConfig, lowrank, lowrank_bytes
from sahc_core.methods.registry import load_compressed
from sahc_core.spectra.spectrum import rank_error_curve

M_OUT, N_IN = 32, 48


def _weight(seed: int) -> torch.Tensor:
    """(32, 48) weight with a slowly decaying spectrum (float32)."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((M_OUT, M_OUT)))
    V, _ = np.linalg.qr(rng.standard_normal((N_IN, M_OUT)))
    return torch.from_numpy(((U * 0.9 ** np.arange(M_OUT)) @ V.T).astype(np.float32))


def _inputs(n_tokens: int, seed: int) -> torch.Tensor:
    """(N, 48) correlated activations: a random rotation of channels with energies spanning 10^3,
    plus one outlier channel (as in LLM activations). float64."""
    rng = np.random.default_rng(100 + seed)
    Q, _ = np.linalg.qr(rng.standard_normal((N_IN, N_IN)))
    d = np.logspace(0, -1.5, N_IN)
    X = rng.standard_normal((n_tokens, N_IN)) @ (Q * d) @ Q.T
    X[:, 3] *= 20.0
    return torch.from_numpy(X)


def _out_err(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||X (W - Ŵ)ᵀ||_F / ||X Wᵀ||_F from the activations themselves (float64)."""
    W, W_hat = W.double(), W_hat.double()
    return float((X @ (W - W_hat).T).norm() / (X @ W.T).norm())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("r", [1, 4, 12, 31])
def test_output_error_is_the_whitened_curve(seed: int, r: int) -> None:
    W, X = _weight(seed), _inputs(400, seed)
    H = X.T @ X
    f = whitened_factors(W, H, device="cpu")
    e = whitened_rank_error_curve(W, H, device="cpu")
    lam = f.whitening.lam
    # The curve, computed independently in numpy from the paper's definition.
    s = np.linalg.svd(W.double().numpy() @ np.linalg.cholesky(H.numpy() + lam * np.eye(N_IN)), compute_uv=False)
    np.testing.assert_allclose(e, np.sqrt(np.r_[np.cumsum((s ** 2)[::-1])[::-1], 0.0] / np.sum(s ** 2)), atol=1e-12)
    # Exact in float64: the truncation minimises ||XΔᵀ||² + λ||Δ||², and leaves e[r]² of it.
    D = W.double() - f.U[:, :r] @ f.UtW[:r]
    lhs = float((X @ D.T).square().sum()) + lam * float(D.square().sum())
    rhs = e[r] ** 2 * (float((X @ W.double().T).square().sum()) + lam * float(W.double().square().sum()))
    assert lhs == pytest.approx(rhs, rel=1e-9)
    # Hence the relative output error is e[r] up to κ = λ / λ_min(H): e_meas²/e[r]² ∈ [1/(1+κ), 1+κ].
    kappa = lam / float(torch.linalg.eigvalsh(H).min())
    assert f.whitening.kappa == pytest.approx(kappa, rel=1e-9) and kappa < 5e-3
    e_meas = _out_err(X, W, f.U[:, :r] @ f.UtW[:r])
    assert abs(e_meas ** 2 / e[r] ** 2 - 1) <= kappa * (1 + 1e-6)
    # Through the stored factors: float32 unquantized, and fp16 (bits=None; 2^-11 relative per entry).
    c = whitened_lowrank(W, H, SVDConfig(rank=r, bits=None), factors=f)
    assert _out_err(X, W, c.u_f32.T @ c.v_f32) == pytest.approx(e[r], rel=1e-4, abs=1e-6)
    assert _out_err(X, W, c.reconstruct()) == pytest.approx(e[r], abs=2e-3)


@pytest.mark.parametrize("r", [2, 6, 16])
def test_beats_plain_svd_whose_output_error_is_not_the_curve(r: int) -> None:
    W, X = _weight(2), _inputs(400, 2)
    H = X.T @ X
    e = whitened_rank_error_curve(W, H, device="cpu")
    cfg = SVDConfig(rank=r, bits=None)
    e_w = _out_err(X, W, whitened_lowrank(W, H, cfg, device="cpu").reconstruct())
    e_plain = _out_err(X, W, lowrank(W, cfg).reconstruct())
    assert e_w == pytest.approx(e[r], abs=2e-3)
    assert e_w < 0.9 * e_plain                  # measured: 4-5x lower output error at these ranks
    assert abs(e_plain - e[r]) > 0.1 * e_plain  # plain SVD's output error is not described by e[r]


def test_solve_form_of_the_paper_gives_the_same_product() -> None:
    """SVD-LLM's factors (U_r Σ_r)(V_rᵀ S⁻¹), S⁻¹ applied by a triangular solve (scipy), equal uᵀv."""
    W, X = _weight(3), _inputs(400, 3)
    H = X.T @ X
    f = whitened_factors(W, H, device="cpu")
    r = 10
    S = f.whitening.S.numpy()
    A = f.U[:, :r].numpy() * f.S[:r].numpy()
    B = scipy.linalg.solve_triangular(S.T, f.Vh[:r].numpy().T, lower=False).T  # B S = V_rᵀ
    c = whitened_lowrank(W, H, SVDConfig(rank=r, bits=None), factors=f)
    np.testing.assert_allclose((c.u_f32.T @ c.v_f32).numpy(), A @ B, rtol=1e-5, atol=1e-6)
    # Balanced split: each component's u and v rows have equal norms.
    torch.testing.assert_close(c.u_f32.norm(dim=1), c.v_f32.norm(dim=1), rtol=1e-5, atol=0)


def test_isotropic_inputs_reduce_to_plain_svd() -> None:
    W = _weight(4)
    H = 7.0 * torch.eye(N_IN, dtype=torch.float64)
    cfg = SVDConfig(rank=8, bits=None)
    torch.testing.assert_close(whitened_lowrank(W, H, cfg, device="cpu").reconstruct(), lowrank(W, cfg).reconstruct(),
                               rtol=0, atol=2e-3)
    s = np.linalg.svd(W.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(whitened_rank_error_curve(W, H, device="cpu"), rank_error_curve(s), atol=1e-9)


@pytest.mark.parametrize("bits", [None, 4])
def test_rank_deficient_statistics_with_a_dead_input(bits: int | None) -> None:
    X = _inputs(20, 5)  # N = 20 < n = 48 tokens
    X[:, 7] = 0.0       # an input that is never active
    H = X.T @ X
    assert int(torch.linalg.cholesky_ex(H).info) > 0  # plain Cholesky fails: regularisation is needed
    W = _weight(5)
    wh = whitening(H, device="cpu")
    assert (wh.dead_inputs, wh.weak_directions) == (1, N_IN - 20)
    assert "28 of 48" in wh.note and "1 dead" in wh.note and wh.kappa == float("inf")
    f = whitened_factors(W, H, device="cpu")
    c = whitened_lowrank(W, H, SVDConfig(rank=12, bits=bits, group_size=16), factors=f)
    W_hat = c.reconstruct()
    assert torch.isfinite(W_hat).all() and torch.isfinite(c.u_f32).all() and torch.isfinite(c.v_f32).all()
    assert float(W_hat.norm()) <= 1.01 * float(W.norm())  # a projection of W (plus quantization)
    # On the calibration inputs the rank-r output error is still the whitened curve (up to λ).
    e = whitened_rank_error_curve(W, H, device="cpu")
    assert _out_err(X, W, f.U[:, :12] @ f.UtW[:12]) == pytest.approx(e[12], rel=1e-3)


@pytest.mark.parametrize("bits,g", [(None, None), (4, 16), (3, None)])
def test_bytes_and_round_trip_match_plain_svd(bits: int | None, g: int | None) -> None:
    W, X = _weight(6), _inputs(400, 6)
    cfg = SVDConfig(rank=9, bits=bits, group_size=g)
    c = whitened_lowrank(W, X.T @ X, cfg, device="cpu")
    assert c.nbytes == lowrank_bytes(tuple(W.shape), cfg) == lowrank(W, cfg).nbytes
    assert sorted(c.state()) == sorted(lowrank(W, cfg).state())
    back = load_compressed(c.state(), c.meta())
    assert torch.equal(back.reconstruct(), c.reconstruct())


def test_new_rank_from_factors_equals_a_fresh_computation() -> None:
    W, X = _weight(7), _inputs(400, 7)
    H = X.T @ X
    f = whitened_factors(W, H, device="cpu")
    for r in (3, 20):
        cfg = SVDConfig(rank=r, bits=4, group_size=16)
        assert torch.equal(whitened_lowrank(W, H, cfg, factors=f).reconstruct(),
                           whitened_lowrank(W, H, cfg, device="cpu").reconstruct())


def test_refuses_bad_statistics() -> None:
    W, X = _weight(8), _inputs(100, 8)
    H = X.T @ X
    cases = [(H[:10, :10], "must be"), (torch.zeros_like(H), "all zero"), (H + torch.triu(H, 1), "symmetric"),
             (H - 2 * torch.diag(H.diagonal()), "symmetric")]
    bad = H.clone()
    bad[1, 1] = float("nan")
    cases.append((bad, "NaN"))
    for Hb, msg in cases:
        with pytest.raises(ValueError, match=msg):
            whitened_lowrank(W, Hb, SVDConfig(rank=4, bits=None), device="cpu")
    with pytest.raises(ValueError, match="damp"):
        whitening(H, damp=0.0)


def test_factor_magnitudes_do_not_scale_with_the_token_count() -> None:
    """H summed over 1e10 times more tokens: same stored factors (SVD-LLM's A = U_r Σ_r would grow 1e5x)."""
    W, X = _weight(9), _inputs(400, 9)
    H = X.T @ X
    cfg = SVDConfig(rank=6, bits=None)
    a, b = whitened_lowrank(W, H, cfg, device="cpu"), whitened_lowrank(W, 1e10 * H, cfg, device="cpu")
    torch.testing.assert_close(a.u_f32.norm(dim=1), b.u_f32.norm(dim=1), rtol=1e-6, atol=0)
    torch.testing.assert_close(b.reconstruct(), a.reconstruct(), rtol=0, atol=1e-5)
    assert b.singular_values[0] == pytest.approx(1e5 * float(a.singular_values[0]), rel=1e-6)
