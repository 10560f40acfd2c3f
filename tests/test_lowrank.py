"""Tests of sahc_core.methods.lowrank against numpy SVD and the Eckart–Young–Mirsky error."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sahc_core.methods.lowrank import SVDConfig, lowrank, lowrank_bytes, resolve_rank, svd_factors
from sahc_core.methods.registry import load_compressed, measure, projected_bytes
from sahc_core.methods.quant import QuantConfig, quant_bytes


def _decaying(m: int, n: int, seed: int, decay: float = 0.85) -> np.ndarray:
    """A matrix with a known, decaying spectrum plus noise (numpy, float32)."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    U, _ = np.linalg.qr(rng.standard_normal((m, k)))
    V, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = decay ** np.arange(k)
    return ((U * s) @ V.T + 1e-3 * rng.standard_normal((m, n))).astype(np.float32)


def _np_eym(W: np.ndarray, r: int) -> float:
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    return float(np.sqrt(np.sum(s[r:] ** 2) / np.sum(s ** 2)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(48, 32), (32, 64), (64, 64)])
@pytest.mark.parametrize("rank", [1, 5, 16])
def test_fp16_factors_match_numpy_truncation(seed: int, shape: tuple, rank: int) -> None:
    W = _decaying(*shape, seed)
    cfg = SVDConfig(rank=rank, bits=None)
    c = lowrank(torch.from_numpy(W), cfg)
    U, s, Vt = np.linalg.svd(W.astype(np.float64), full_matrices=False)
    W_r = (U[:, :rank] * s[:rank]) @ Vt[:rank]
    np.testing.assert_allclose(c.reconstruct().numpy(), W_r, atol=2e-3 * np.abs(W_r).max() + 1e-6)
    m = measure(torch.from_numpy(W), cfg, compressed=c)
    eym = _np_eym(W, rank)
    assert m["rank"] == rank
    assert m["eym_error"] == pytest.approx(eym, rel=1e-4, abs=1e-6)
    assert m["trunc_error"] == pytest.approx(eym, rel=1e-3, abs=1e-5)  # measured == EYM for an exact SVD
    assert m["quant_error"] < 2e-3  # fp16 rounding of the factors only
    assert m["bytes"] == 2 * rank * sum(shape) == lowrank_bytes(shape, cfg) == c.nbytes


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_factors_error_split(bits: int) -> None:
    W = _decaying(64, 96, seed=3, decay=0.95)
    cfg = SVDConfig(rank=24, bits=bits, group_size=32)
    m = measure(torch.from_numpy(W), cfg)
    assert m["trunc_error"] == pytest.approx(_np_eym(W, 24), rel=1e-3)
    # The residual W - W_r is orthogonal to span(U_r) and span(V_r), where the first-order factor
    # quantization error lies, so total² ≈ trunc² + quant² (up to the second-order ΔA·ΔB term).
    assert m["rel_error"] ** 2 == pytest.approx(m["trunc_error"] ** 2 + m["quant_error"] ** 2, rel=0.05)
    assert m["bytes"] == quant_bytes((24, 64), QuantConfig(bits, 32)) + quant_bytes((24, 96), QuantConfig(bits, 32))


def test_quant_error_shrinks_with_bits() -> None:
    W = torch.from_numpy(_decaying(64, 64, seed=4, decay=0.97))
    errs = [measure(W, SVDConfig(rank=32, bits=b, group_size=32))["quant_error"] for b in (2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_full_rank_fp16_is_near_exact() -> None:
    W = torch.from_numpy(_decaying(40, 24, seed=5))
    m = measure(W, SVDConfig(rank_fraction=1.0, bits=None))
    assert m["rank"] == 24 and m["eym_error"] == 0.0 and m["rel_error"] < 2e-3 and m["weight_cosine"] > 0.9999


def test_factors_are_reused_and_sliced() -> None:
    W = torch.from_numpy(_decaying(32, 48, seed=6))
    f = svd_factors(W, device="cpu")
    assert [tuple(t.shape) for t in f] == [(32, 32), (32,), (32, 48)]
    assert torch.all(f[1][:-1] >= f[1][1:])
    np.testing.assert_allclose(f[1].numpy(), np.linalg.svd(W.numpy().astype(np.float64), compute_uv=False), rtol=1e-4, atol=1e-6)
    for r in (1, 7, 32):
        cfg = SVDConfig(rank=r, bits=4, group_size=16)
        a, b = lowrank(W, cfg, factors=f), lowrank(W, cfg)
        assert torch.allclose(a.reconstruct(), b.reconstruct(), atol=1e-5)
    with pytest.raises(ValueError, match="do not belong"):
        lowrank(W.T, SVDConfig(rank=3, bits=None), factors=f)


@pytest.mark.parametrize("cfg", [SVDConfig(rank=3, bits=None), SVDConfig(rank=5, bits=3, group_size=8, scheme="sym"),
                                 SVDConfig(rank_fraction=0.5, bits=4, group_size=None)], ids=repr)
@pytest.mark.parametrize("shape", [(16, 24), (4, 4, 16)])
def test_bytes_exact_and_load_roundtrip(cfg: SVDConfig, shape: tuple) -> None:
    torch.manual_seed(0)
    W = torch.randn(shape)
    c = lowrank(W, cfg)
    assert c.reconstruct().shape == W.shape
    assert projected_bytes(shape, cfg) == c.nbytes == sum(t.numel() * t.element_size() for t in c.state().values())
    back = load_compressed({k: v.clone() for k, v in c.state().items()}, c.meta())
    assert torch.equal(back.reconstruct(), c.reconstruct())
    m_fresh, m_loaded = measure(W, cfg, compressed=c), measure(W, cfg, compressed=back)
    assert m_loaded["trunc_error"] == pytest.approx(m_fresh["trunc_error"], rel=1e-5)


def test_rank_resolution_and_validation() -> None:
    assert resolve_rank((100, 40), SVDConfig(rank_fraction=0.25)) == 10
    assert resolve_rank((100, 40), SVDConfig(rank_fraction=0.001)) == 1
    with pytest.raises(ValueError, match="exceeds min"):
        resolve_rank((10, 8), SVDConfig(rank=9))
    with pytest.raises(ValueError, match="at least 1"):
        SVDConfig(rank=0)
    for f in (0, 0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="rank_fraction"):
            SVDConfig(rank_fraction=f)
    with pytest.raises(ValueError, match="exactly one"):
        SVDConfig()
    with pytest.raises(ValueError, match="exactly one"):
        SVDConfig(rank=2, rank_fraction=0.5)
    with pytest.raises(ValueError, match="bits must be"):
        SVDConfig(rank=2, bits=1)
    with pytest.raises(ValueError, match="must divide both"):
        lowrank(torch.randn(48, 40), SVDConfig(rank=2, group_size=16))
    with pytest.raises(ValueError, match="must divide both"):
        lowrank_bytes((48, 40), SVDConfig(rank=2, group_size=16))
    with pytest.raises(ValueError, match="needs a matrix"):
        lowrank_bytes((10,), SVDConfig(rank=1))


def test_zero_matrix() -> None:
    m = measure(torch.zeros(8, 8), SVDConfig(rank=2, bits=None))
    assert m["rel_error"] == 1.0 and m["eym_error"] == 1.0 and np.isfinite(m["quant_error"])
