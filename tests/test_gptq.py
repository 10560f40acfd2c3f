"""Tests of sahc_core.methods._gptq against a slow float64 Algorithm 1 written here from the paper, the
RTN format of quant (bit-exact storage), and output errors measured on the activations themselves."""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch

from sahc_core.methods import quant
from sahc_core.methods._gptq import gptq_quantize
from sahc_core.methods.quant import QuantConfig

ONE_SENTENCE = re.compile(r"^[^\n]+\.$")


def _activations(tokens: int, n: int, seed: int) -> torch.Tensor:
    """``(tokens, n)`` float64 ``Z A`` with singular values of ``A`` decaying as ``i^-1`` and two 8x channels."""
    return _activations_cached(tokens, n, seed).clone()


@functools.lru_cache(maxsize=None)
def _activations_cached(tokens: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    A = (U * torch.arange(1, n + 1, dtype=torch.float64) ** -1.0) @ V.T
    X = torch.randn(tokens, n, generator=gen, dtype=torch.float64) @ A.T
    X[:, [1, n // 2]] *= 8
    return X


def _weight(m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(m, n, generator=gen) * torch.rand(m, 1, generator=gen) + 0.1


def _codes(res, cfg: QuantConfig) -> np.ndarray:
    """The stored grid values ``(m, n)`` (``sym``: ``q - Q`` in ``[-Q, Q]``), from the packed bitstream."""
    m, n = res.quantized.shape
    q = quant.unpack_codes(res.quantized.codes, cfg.bits, m * n).numpy().reshape(m, n).astype(np.float64)
    return q - (2 ** (cfg.bits - 1) - 1) if cfg.scheme == "sym" else q


def _is_fp16_rounding(stored: np.ndarray, exact: np.ndarray, atol: np.ndarray) -> bool:
    """``stored`` (fp16) is a round-to-nearest of a value within ``atol`` of ``exact`` (float64)."""
    half_ulp = 0.5 * np.abs(np.spacing(stored)).astype(np.float64)
    return bool(np.all(np.abs(stored.astype(np.float64) - exact) <= half_ulp + atol))


def _replay_algorithm1(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, res, damp: float,
                       act_order: bool, drift: float = 1e-5) -> tuple[np.ndarray, int]:
    """Algorithm 1 of Frantar et al. 2022 column by column in float64 (no lazy batching; ``H⁻¹`` and its
    upper Cholesky factor computed explicitly), replaying ``res``'s choices.

    Our loop runs in float32, so its updated weights differ from these by rounding: we allow
    ``drift · max|w|`` per row (1e-5, about 80 float32 epsilons of the row's largest weight; measured:
    at most 2.2e-7 over this file's cases, the same code run in float64 agrees to 1e-12). At each
    column the stored code must be a nearest grid point (clamped) of the reference's error-updated
    weight up to that drift, and the reference continues with the stored code, so one near-midpoint
    weight cannot cascade. At each group start (no act_order) the stored scale / zero must be the fp16
    rounding of the reference's current group range, up to the same drift. Returns the reference ``Ŵ``
    (float64, from the stored codes and scales) and how many codes took the farther grid point.
    """
    m, n = W.shape
    g = n if cfg.group_size is None else cfg.group_size
    d = H.diagonal().numpy().copy()
    Hd = H.numpy().copy()
    Hd[np.diag_indices(n)] = np.where(d == 0, 1.0, d) + damp * d.mean()
    order = np.argsort(-d, kind="stable") if act_order else np.arange(n)
    U = np.linalg.cholesky(np.linalg.inv(Hd[np.ix_(order, order)])).T  # upper, H⁻¹ = UᵀU
    w = W.double().numpy()[:, order].copy()  # (m, n) in processing order, updated in place
    codes = _codes(res, cfg)
    s16 = res.quantized.scales.numpy()
    z16 = res.quantized.zeros.numpy() if cfg.scheme == "asym" else np.zeros_like(s16)
    lo, hi = (-(2 ** (cfg.bits - 1) - 1), 2 ** (cfg.bits - 1) - 1) if cfg.scheme == "sym" else (0, 2 ** cfg.bits - 1)
    w_hat, farther = np.empty_like(w), 0
    for j in range(n):
        col = order[j]
        grp = col // g
        atol = drift * np.abs(w).max(1)  # (m,)
        if not act_order and col % g == 0:  # the grid of the group from its current weights
            cur = w[:, j:j + g]
            if cfg.scheme == "sym":
                assert _is_fp16_rounding(s16[:, grp], np.abs(cur).max(1) / hi, atol), f"scale of group {grp}"
            else:
                assert _is_fp16_rounding(z16[:, grp], cur.min(1), atol), f"zero of group {grp}"
                assert _is_fp16_rounding(s16[:, grp], (cur.max(1) - z16[:, grp].astype(np.float64)) / hi, atol), \
                    f"scale of group {grp}"
        s, z = s16[:, grp].astype(np.float64), z16[:, grp].astype(np.float64)
        s_safe = np.where(s > 0, s, 1.0)
        t = np.clip((w[:, j] - z) / s_safe, lo, hi)  # position on the grid, in steps
        dist = np.abs(t - codes[:, col])
        assert np.all(dist <= 0.5 + atol / s_safe), f"column {col}: a code off the nearest grid point"
        farther += int(np.sum(dist > 0.5))
        w_hat[:, j] = codes[:, col] * s + z
        err = (w[:, j] - w_hat[:, j]) / U[j, j]
        w[:, j:] -= np.outer(err, U[j, j:])
    return w_hat[:, np.argsort(order)], farther


# block 5: groups of 8 / 16 / 48 span several blocks; 12: blocks cut to 8 for groups of 8 and at group
# starts for 16 / 48; 128: one block. 8 bits: the finest grid, where the float32 drift matters most.
@pytest.mark.parametrize("bits,block_size", [(3, 5), (3, 12), (3, 128), (8, 12)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 8, 16])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_matches_algorithm1_reference(scheme: str, group_size: int | None, act_order: bool, bits: int,
                                      block_size: int) -> None:
    m, n = 12, 48
    X = _activations(256, n, seed=bits)
    H, W = X.T @ X, _weight(m, n, seed=bits)
    cfg = QuantConfig(bits, group_size, scheme)
    res = gptq_quantize(W, H, cfg, block_size=block_size, act_order=act_order)
    ref, farther = _replay_algorithm1(W, H, cfg, res, 0.01, act_order)
    assert farther <= 2  # the drift allowance is for rare float32 midpoints, not a licence
    np.testing.assert_allclose(res.w_hat.numpy(), ref, rtol=1e-6, atol=1e-7)  # float32 decode vs float64
    if act_order or group_size is None:  # grids from the original W: exactly RTN's
        rtn = quant.quantize(W, cfg)
        assert torch.equal(res.quantized.scales, rtn.scales)
        assert scheme == "sym" or torch.equal(res.quantized.zeros, rtn.zeros)
    assert res.damp_used == 0.01 and res.dead_columns == 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape,group_size", [((9, 32), None), ((9, 32), 16), ((5, 21), 7)])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_storage_is_bit_exact_rtn_format(bits: int, scheme: str, shape: tuple[int, int], group_size: int | None,
                                         act_order: bool) -> None:
    m, n = shape
    X = _activations(64, n, seed=bits)
    W = _weight(m, n, seed=bits)
    cfg = QuantConfig(bits, group_size, scheme)
    res = gptq_quantize(W, X.T @ X, cfg, act_order=act_order)
    assert res.w_hat.dtype == torch.float32 and res.w_hat.shape == (m, n)
    assert torch.equal(quant.dequantize(res.quantized), res.w_hat)
    assert res.quantized.nbytes == quant.quant_bytes((m, n), cfg)
    again = quant.QuantizedTensor.from_state(res.quantized.state(), (m, n), cfg)  # storable as is
    assert torch.equal(again.reconstruct(), res.w_hat)


def test_input_dtypes_and_inputs_untouched() -> None:
    X = _activations(128, 32, seed=0)
    H, W = X.T @ X, _weight(8, 32, seed=0)
    cfg = QuantConfig(4, 16, "asym")
    W0, H0 = W.clone(), H.clone()
    res = gptq_quantize(W, H, cfg, act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.equal(gptq_quantize(W.double(), H.float(), cfg, act_order=True).w_hat,
                       gptq_quantize(W, H.float(), cfg, act_order=True).w_hat)
    Wb = W.bfloat16()
    assert torch.equal(gptq_quantize(Wb, H, cfg).w_hat, gptq_quantize(Wb.float(), H, cfg).w_hat)
    assert res.w_hat.dtype == torch.float32


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("group_size", [None, 32])
def test_output_error_below_rtn(group_size: int | None, scheme: str, act_order: bool) -> None:
    m, n = 48, 128
    X = _activations(1024, n, seed=7)
    W = _weight(m, n, seed=7)
    H = X.T @ X
    Xf = X.float()
    for bits in (2, 3, 4, 8):
        cfg = QuantConfig(bits, group_size, scheme)
        res = gptq_quantize(W, H, cfg, act_order=act_order)
        ours = float(torch.linalg.norm(Xf @ (W - res.w_hat).T))
        rtn = float(torch.linalg.norm(Xf @ (W - quant.fake_quantize(W, cfg)).T))
        assert ours < (0.6 if bits in (3, 4) else 1.0) * rtn, (bits, ours / rtn)
        # proxy loss = Σ OBS increments = ‖X Eᵀ‖² + λ‖E‖² for a quadratic (λ = damp · mean diag H)
        E = (W - res.w_hat).double()
        lam = res.damp_used * float(H.diagonal().mean())
        assert res.proxy_loss == pytest.approx(float(torch.linalg.norm(X @ E.T)) ** 2 + lam * float((E ** 2).sum()),
                                               rel=1e-4)


def test_scale_invariant_in_h() -> None:
    X = _activations(256, 64, seed=3)
    H, W = X.T @ X, _weight(16, 64, seed=3)
    cfg = QuantConfig(3, 16, "asym")
    for act_order in (False, True):
        res = gptq_quantize(W, H, cfg, act_order=act_order)
        # a power of 4 scales every float operation exactly (its square root too): identical results
        big = gptq_quantize(W, H * 4.0 ** 6, cfg, act_order=act_order)
        assert torch.equal(big.w_hat, res.w_hat) and torch.equal(big.quantized.codes, res.quantized.codes)
        assert big.proxy_loss == pytest.approx(res.proxy_loss * 4.0 ** 6, rel=1e-12)
        # any other factor (the 1/tokens of a normalised H): the same up to float rounding
        mean = gptq_quantize(W, H / 256 / 3, cfg, act_order=act_order)
        assert (_codes(mean, cfg) == _codes(res, cfg)).mean() > 0.99


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_are_rounded_not_zeroed(act_order: bool) -> None:
    n, dead = 32, [3, 20]
    X = _activations(128, n, seed=5)
    X[:, dead] = 0
    H, W = X.T @ X, _weight(8, n, seed=5)
    W[:, dead] = 0.5 * W.amax(1, keepdim=True)  # inside every group's range (sets no grid), far from 0
    for cfg in (QuantConfig(3, None, "sym"), QuantConfig(3, 8, "asym")):
        res = gptq_quantize(W, H, cfg, act_order=act_order)
        assert res.dead_columns == 2 and torch.isfinite(res.w_hat).all() and res.damp_used == 0.01
        # it gets no feedback: its ORIGINAL weights, rounded on its group's stored grid (not zeroed)
        g = n if cfg.group_size is None else cfg.group_size
        for c in dead:
            s = res.quantized.scales[:, c // g].float()
            z = res.quantized.zeros[:, c // g].float() if cfg.scheme == "asym" else torch.zeros_like(s)
            lo, hi = (-3, 3) if cfg.scheme == "sym" else (0, 7)
            expect = torch.clamp(torch.round((W[:, c] - z) / torch.where(s > 0, s, 1.0)), lo, hi) * s + z
            assert torch.equal(res.w_hat[:, c], expect) and bool((expect != 0).all())
        if cfg.group_size is None:
            assert torch.equal(res.w_hat[:, dead], quant.fake_quantize(W, cfg)[:, dead])
        # and gives none: with its rounding error removed beforehand, nothing else changes
        assert bool((res.w_hat[:, dead] != W[:, dead]).any())
        W2 = W.clone()
        W2[:, dead] = res.w_hat[:, dead]
        assert torch.equal(gptq_quantize(W2, H, cfg, act_order=act_order).w_hat, res.w_hat)


def test_all_inputs_dead_is_plain_rtn() -> None:
    W = _weight(6, 16, seed=2)
    cfg = QuantConfig(4, 8, "sym")
    res = gptq_quantize(W, torch.zeros(16, 16, dtype=torch.float64), cfg)
    assert res.dead_columns == 16 and res.proxy_loss == 0.0
    assert torch.equal(res.w_hat, quant.fake_quantize(W, cfg))


@pytest.mark.parametrize("act_order", [False, True])
def test_rank_deficient_h(act_order: bool) -> None:
    n = 64
    X = _activations(16, n, seed=9)  # 16 tokens: H has rank 16 of 64
    H, W = X.T @ X, _weight(32, n, seed=9)
    cfg = QuantConfig(3, 16, "asym")
    res = gptq_quantize(W, H, cfg, act_order=act_order)
    assert res.damp_used == 0.01 and torch.isfinite(res.w_hat).all()
    Xf = X.float()
    ours = torch.linalg.norm(Xf @ (W - res.w_hat).T)
    rtn = torch.linalg.norm(Xf @ (W - quant.fake_quantize(W, cfg)).T)
    assert ours < 0.5 * rtn  # 48 free directions absorb most of the error on the 16 tokens


def test_cholesky_retry_reports_damping() -> None:
    n = 24
    Q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).Q
    lam = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    lam[0] = -0.05  # slightly indefinite (as from rounding): fails at 1 % of mean diag 1.5, factors at 10 %
    H = (Q * lam) @ Q.T
    res = gptq_quantize(_weight(4, n, seed=4), H, QuantConfig(4, None, "asym"))
    assert res.damp_used == pytest.approx(0.1) and torch.isfinite(res.w_hat).all()
    assert gptq_quantize(_weight(4, n, seed=4), H, QuantConfig(4, None, "asym"), damp=0.2).damp_used == 0.2


def _bad_h(kind: str, n: int) -> torch.Tensor:
    X = _activations(64, n, seed=1)
    H = X.T @ X
    if kind == "nan":
        H[2, 5] = float("nan")
    elif kind == "inf":
        H[3, 3] = float("inf")
    elif kind == "asymmetric":
        H[0, 1] += 1.0
    elif kind == "negative_diag":
        H[4, 4] = -1.0
    elif kind == "minor":  # |H_ij| > sqrt(H_ii H_jj)
        H[0, 1] = H[1, 0] = 2 * float((H[0, 0] * H[1, 1]).sqrt())
    elif kind == "indefinite":  # passes the cheap checks, but λ_min = -mean(diag): no dampening <= 100 % helps
        H = torch.eye(n, dtype=torch.float64) - (2.0 / n) * torch.ones(n, n, dtype=torch.float64)
    elif kind == "dead_with_coupling":
        H[6, 6] = 0.0
    return H


@pytest.mark.parametrize("kind", ["nan", "inf", "asymmetric", "negative_diag", "minor", "indefinite",
                                  "dead_with_coupling"])
def test_bad_hessian_raises_one_sentence(kind: str) -> None:
    with pytest.raises(ValueError, match="^H ") as err:
        gptq_quantize(_weight(4, 16, seed=0), _bad_h(kind, 16), QuantConfig(4, 8, "asym"))
    assert ONE_SENTENCE.match(str(err.value))


@pytest.mark.parametrize("W,H,kwargs,match", [
    (torch.zeros(4, 16), torch.eye(15), {}, "H must be the"),
    (torch.zeros(16), torch.eye(16), {}, "W must be a 2-D"),
    (torch.zeros(2, 4, 16), torch.eye(16), {}, "W must be a 2-D"),
    (torch.zeros(4, 16, dtype=torch.int32), torch.eye(16), {}, "W must be a 2-D float"),
    (torch.zeros(4, 16), torch.eye(16), {"damp": 0.0}, "damp must be"),
    (torch.zeros(4, 16), torch.eye(16), {"damp": float("nan")}, "damp must be"),
    (torch.zeros(4, 16), torch.eye(16), {"block_size": 0}, "block_size must be"),
    (torch.zeros(4, 18), torch.eye(18), {}, "group_size 8 does not divide"),
    (torch.full((4, 16), float("nan")), torch.eye(16), {}, "NaN or Inf"),
])
def test_bad_arguments_raise_one_sentence(W: torch.Tensor, H: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        gptq_quantize(W, H, QuantConfig(4, 8, "asym"), **kwargs)
    assert ONE_SENTENCE.match(str(err.value))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    X = _activations(256, 64, seed=11)
    H, W = X.T @ X, _weight(16, 64, seed=11)
    cfg = QuantConfig(4, 16, "asym")
    cpu = gptq_quantize(W, H, cfg, act_order=True)
    gpu = gptq_quantize(W.cuda(), H, cfg, act_order=True)
    assert torch.equal(quant.dequantize(gpu.quantized), gpu.w_hat)
    assert (_codes(gpu, cfg) == _codes(cpu, cfg)).mean() > 0.99  # float rounding differs between devices
