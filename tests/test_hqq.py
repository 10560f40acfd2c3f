"""Tests of sahc_core.methods._hqq: RTN start, never worse than RTN, storage exactness, and agreement
with an independent float64 reference of the paper's iteration and with the ``hqq`` package."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sahc_core.methods._hqq import hqq_quantize, hqq_solve, shrink_lp
from sahc_core.methods.quant import (
    QuantConfig,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    quant_bytes,
    quantize,
    unpack_codes,
)


def _heavy(m: int, n: int, seed: int, df: float = 3.0) -> torch.Tensor:
    """Student-t weights (heavy tails like trained LLM weights), scale 0.02, with a few outlier columns."""
    rng = np.random.default_rng(seed)
    W = 0.02 * rng.standard_t(df, size=(m, n))
    W[:, rng.choice(n, size=max(1, n // 64), replace=False)] *= 4.0
    return torch.from_numpy(W.astype(np.float32))


def _rel(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    d = (W.double() - W_hat.double()).norm()
    return float(d / W.double().norm())


@pytest.mark.parametrize("bits,g", [(4, 128), (3, 32), (2, None)])
def test_zero_iterations_is_rtn_bit_for_bit(bits: int, g: int | None) -> None:
    W = _heavy(48, 256, seed=0)
    cfg = QuantConfig(bits, g)
    got, ref = hqq_quantize(W, cfg, iters=0, device="cpu"), quantize(W, cfg)
    for key, t in ref.state().items():
        assert torch.equal(got.state()[key], t), key


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("g", [None, 32, 64, 128])
def test_beats_rtn_on_heavy_tailed_weights(bits: int, g: int | None) -> None:
    W = _heavy(96, 256, seed=bits)
    cfg = QuantConfig(bits, g)
    res = hqq_solve(W, cfg, device="cpu")
    rtn = _rel(W, fake_quantize(W, cfg))
    assert res.rtn_rel_error == pytest.approx(rtn, rel=1e-12)
    assert res.rel_error == pytest.approx(_rel(W, dequantize(res.quantized)), rel=1e-12)
    # Measured: 4-17% lower than RTN at int3/int4 on these weights; 1% is the asserted margin.
    assert res.rel_error < 0.99 * rtn
    assert 1 <= res.iterations <= 20


@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_rtn_group_by_group(seed: int) -> None:
    W = _heavy(32, 128, seed=10 + seed, df=2.0) * 100.0  # errors ~1: the shrink (threshold 1) is active
    cfg = QuantConfig(2 + seed % 3, 32)
    qt = hqq_quantize(W, cfg, lp_norm=0.5, beta=1.0, kappa=1.2, device="cpu")  # strong shrink: not monotone
    err = (W - dequantize(qt)).reshape(32, 4, 32).square().sum(-1)
    err_rtn = (W - fake_quantize(W, cfg)).reshape(32, 4, 32).square().sum(-1)
    assert bool((err <= err_rtn * (1 + 1e-6)).all())


def test_codes_are_nearest_on_the_stored_grid_and_state_round_trips() -> None:
    """The stored codes are round((w - z)/s) for the STORED fp16 s, z (float64 here), so the error of
    ``dequantize`` is the error of the grid HQQ chose; and state() reloads to the same tensor."""
    W = _heavy(40, 192, seed=5)
    cfg = QuantConfig(3, 64)
    qt = hqq_quantize(W, cfg, device="cpu")
    s = qt.scales.double().numpy()[..., None]
    z = qt.zeros.double().numpy()[..., None]
    x = W.double().numpy().reshape(40, 3, 64)
    t = (x - z) / s
    want = np.clip(np.round(t), 0, 7)
    codes = unpack_codes(qt.codes, 3, W.numel()).numpy().reshape(40, 3, 64)
    tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4  # float32 vs float64 rounding at a midpoint
    assert np.array_equal(codes[~tie], want[~tie])
    np.testing.assert_array_equal(dequantize(qt).double().numpy(), (codes * s + z).reshape(40, 192).astype(np.float32))
    again = QuantizedTensor.from_state(qt.state(), qt.shape, cfg)
    assert torch.equal(dequantize(again), dequantize(qt))


@pytest.mark.parametrize("shape,g", [((64, 256), 128), ((48, 96), 32), ((1536,), 64), ((4, 6, 64), None)])
def test_bytes_equal_rtn_asym(shape: tuple, g: int | None) -> None:
    W = 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    cfg = QuantConfig(4, g)
    qt = hqq_quantize(W, cfg, device="cpu")
    assert qt.nbytes == quant_bytes(shape, cfg) == quantize(W, cfg).nbytes
    assert dequantize(qt).shape == W.shape


def test_zero_range_groups_stay_exact() -> None:
    W = _heavy(8, 64, seed=2)
    W[0] = 0.0
    W[1, :32] = 0.125
    qt = hqq_quantize(W, QuantConfig(4, 32), device="cpu")
    W_hat = dequantize(qt)
    assert torch.equal(W_hat[0], W[0]) and torch.equal(W_hat[1, :32], W[1, :32])


def test_refuses_bad_input() -> None:
    W = _heavy(8, 64, seed=0)
    with pytest.raises(ValueError, match="sym"):
        hqq_quantize(W, QuantConfig(4, 32, "sym"))
    W[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hqq_quantize(W, QuantConfig(4, 32), device="cpu")
    for kw in ({"iters": -1}, {"iters": 2.5}, {"lp_norm": 1.5}, {"lp_norm": "0.7"}, {"beta": 0.0}, {"kappa": 1.0}):
        with pytest.raises(ValueError):
            hqq_quantize(_heavy(8, 64, seed=0), QuantConfig(4, 32), device="cpu", **kw)


def _reference_hqq(W: np.ndarray, bits: int, g: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
                   kappa: float = 1.01) -> np.ndarray:
    """The paper's iteration group by group in float64 from the fp16 min-max grid: codes, lp shrink of
    the error, least-squares zero, z rounded to fp16; the best iterate by squared error, stopping at
    the first non-improving one. Returns ŵ."""
    qmax = 2 ** bits - 1
    out = np.empty_like(W, dtype=np.float64)
    for i in range(W.shape[0]):
        for j in range(0, W.shape[1], g):
            w = W[i, j:j + g].astype(np.float64)
            z = float(np.float16(w.min()))
            s = float(np.float16((w.max() - np.float32(z)) / qmax))

            def recon(z: float) -> np.ndarray:
                return np.clip(np.round((w - z) / s), 0, qmax) * s + z

            best_z, best_e, b = z, np.sum((w - recon(z)) ** 2), beta
            for _ in range(iters):
                e_vec = w - recon(z)
                a = np.abs(e_vec)
                with np.errstate(divide="ignore"):
                    w_e = np.sign(e_vec) * np.maximum(a - a ** (p - 1) / b, 0.0)
                z = float(np.float16(np.mean(w - w_e - (recon(z) - z))))
                b *= kappa
                e = np.sum((w - recon(z)) ** 2)
                if e >= best_e:
                    break
                best_z, best_e = z, e
            out[i, j:j + g] = recon(best_z)
    return out


@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30x: errors above the shrink threshold, W_e != 0
def test_matches_float64_reference_of_the_paper(scale: float) -> None:
    W = _heavy(12, 128, seed=7) * scale
    res = hqq_solve(W, QuantConfig(3, 32), device="cpu")
    ref = _reference_hqq(W.numpy(), 3, 32)
    assert res.rel_error == pytest.approx(_rel(W, torch.from_numpy(ref)), rel=2e-3)


def test_shrink_matches_hqq_package() -> None:
    optimize = pytest.importorskip("hqq.core.optimize")
    x = torch.linspace(-2.0, 2.0, 4001)
    for beta, p in ((10.0, 0.7), (1.0, 0.5), (100.0, 1.0)):
        torch.testing.assert_close(shrink_lp(x, beta, p), optimize.shrink_lp_op(x.clone(), beta, p), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits,g", [(4, 64), (3, 64), (3, 32)])
def test_agrees_with_hqq_package(bits: int, g: int) -> None:
    """Same tensor through ``hqq``'s Quantizer (its defaults, groups along rows): errors within 0.5% of
    RTN's error of each other (measured: within 0.1% on SmolLM2 int3/int4; the stop rules differ)."""
    quantize_mod = pytest.importorskip("hqq.core.quantize")
    W = _heavy(128, 256, seed=11)
    res = hqq_solve(W, QuantConfig(bits, g), device="cpu")
    W_q, meta = quantize_mod.Quantizer.quantize(W, nbits=bits, group_size=g, axis=1, optimize=True,
                                                bitpack=False, device="cpu")
    theirs = _rel(W, ((W_q.float() - meta["zero"]) * meta["scale"]).reshape(W.shape))
    assert abs(res.rel_error - theirs) <= 0.005 * res.rtn_rel_error


@pytest.fixture(scope="module")
def down_proj() -> torch.Tensor:
    """Rows of layer 15's 576x1536 down projection of the embedded default model (SmolLM2-135M)."""
    from sahc_core.io.default_model import default_model_dir
    from sahc_core.io.source import ModelSource

    W = ModelSource.open(default_model_dir()).read("model.layers.15.mlp.down_proj.weight", dtype=torch.float32)
    return W[:192].contiguous()  # a third of its rows keeps the test fast on a busy CPU


@pytest.mark.parametrize("bits,g", [(4, 128), (3, 128), (4, 64)])
def test_real_default_model_tensor(down_proj: torch.Tensor, bits: int, g: int) -> None:
    W = down_proj
    res = hqq_solve(W, QuantConfig(bits, g), device="cpu")
    # Measured on these rows: int4 g128 0.1014 vs RTN 0.1058, int3 g128 0.2283 vs 0.2332 (-2.1%).
    assert res.rel_error < 0.985 * res.rtn_rel_error
    assert res.rtn_rel_error == pytest.approx(_rel(W, fake_quantize(W, QuantConfig(bits, g))), rel=1e-12)
