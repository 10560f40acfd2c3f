"""The error predictions behind the theory gate, each against an independent computation.

- int-k: the rounding-noise model from the stored scales vs the same model written out from the group
  ranges in float64, and vs the measured error on Gaussian weights; weights already on the grid
  measure far below the model, and the gate says so.
- fp16 storage noise (``ulp²/12``) vs the mean squared error of a real fp16 cast.
- SVD: the prediction from σ and the factors' steps vs a Monte-Carlo of the same noise model applied to
  the exact factors in float64, and vs the measured error; it never reads the measured factor error.
- TT: the discarded energies of the sweep vs the error of the unrounded cores contracted by hand, and
  against Oseledets' Thm 2.2 bound from the unfoldings of the original tensor (numpy SVD); quantized
  cores vs the measured error. The cores stay bit-identical to the stored ones.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sahc_core.gates import tensor_gates
from sahc_core.methods import registry
from sahc_core.methods.keep import KeepConfig
from sahc_core.methods.lowrank import SVDConfig, lowrank
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.rtn import rounding_noise_var
from sahc_core.methods.tt import TTConfig, _layout, _tensorize, tt_decompose


def _theory(m: dict):
    return {g.gate: g for g in tensor_gates("w", m)}.get("theory_vs_actual")


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q1 = torch.linalg.qr(torch.randn(m, n, generator=g))[0]
    Q2 = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    return Q1 @ torch.diag(torch.logspace(0, -1.5, n)) @ Q2


@pytest.mark.parametrize("bits,group,scheme", [(4, 32, "asym"), (2, 64, "asym"), (8, None, "asym"), (3, 32, "sym")])
def test_int_prediction_is_the_noise_model_of_the_group_ranges(bits, group, scheme):
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    m = registry.measure(W, QuantConfig(bits, group, scheme))
    g = group or 128
    x = W.double().reshape(64, 128 // g, g)
    if scheme == "asym":
        step = (x.amax(-1) - x.amin(-1)) / (2**bits - 1)
    else:
        step = x.abs().amax(-1) / (2 ** (bits - 1) - 1)
    ref = math.sqrt(float((g * step**2 / 12).sum())) / float(W.double().norm())
    assert m["predicted_error"] == pytest.approx(ref, rel=2e-3)  # fp16-rounded scales in the method
    t = _theory(m)
    assert t.passed and 0.8 < t.value < 1.2, t.value  # Gaussian weights follow the model closely


def test_weights_already_on_the_grid_fail_the_lower_side():
    """A GGUF-style checkpoint re-quantized on its own blocks: error ~0, the noise model ~5 %."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (32, 64), generator=g).float()
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group spans the whole grid, so min-max RTN finds the same grid
    scale = (torch.rand(32, 2, generator=g) + 0.5).half().float().repeat_interleave(32, 1)
    W = codes * scale
    m = registry.measure(W, QuantConfig(4, 32))
    assert m["rel_error"] < 0.05 * m["predicted_error"]  # only the fp16 rounding of the recomputed scale
    t = _theory(m)
    assert not t.passed and t.value < 0.5


def test_fp16_noise_variance_matches_a_real_cast():
    x = torch.randn(256, 512, generator=torch.Generator().manual_seed(4)) * torch.logspace(-6, 3, 512)
    var = rounding_noise_var(x, None)
    err2 = (x.double() - x.half().double()) ** 2
    assert float(err2.sum()) == pytest.approx(float(var.sum()), rel=0.05)
    assert float(rounding_noise_var(torch.zeros(2, 3), None).sum()) == 0.0


@pytest.mark.parametrize("cfg", [SVDConfig(rank=24, bits=4, group_size=32), SVDConfig(rank=64, bits=2, group_size=32),
                                 SVDConfig(rank=64, bits=None), SVDConfig(rank=8, bits=8, group_size=None)],
                         ids=["r24-int4", "r64-int2", "full-fp16", "r8-int8-row"])
def test_svd_prediction_against_monte_carlo_of_the_noise_model(cfg):
    W = _decaying(96, 64, 5)
    m = registry.measure(W, cfg)
    # independent: exact float64 factors, uniform noise of each stored entry's variance, averaged
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = m["rank"]
    u = (U[:, :r] * S[:r].sqrt()).T
    v = S[:r].sqrt()[:, None] * Vh[:r]
    q = cfg.quant_config
    var_u, var_v = rounding_noise_var(u.float(), q), rounding_noise_var(v.float(), q)
    gen = torch.Generator().manual_seed(6)
    draws = []
    for _ in range(40):
        a = (torch.rand(u.shape, generator=gen, dtype=torch.float64) - 0.5) * (12 * var_u).sqrt()
        b = (torch.rand(v.shape, generator=gen, dtype=torch.float64) - 0.5) * (12 * var_v).sqrt()
        draws.append(float(((W.double() - (u + a).T @ (v + b)) ** 2).sum()))
    mc = math.sqrt(np.mean(draws)) / float(W.double().norm())
    assert m["predicted_error"] == pytest.approx(mc, rel=0.02)
    eym = math.sqrt(float((S[r:] ** 2).sum() / (S**2).sum()))
    assert m["eym_error"] == pytest.approx(eym, rel=1e-4, abs=1e-7)
    t = _theory(m)
    assert t.passed and 0.8 < t.value < 1.25, t.value


def test_svd_prediction_does_not_read_the_measured_factor_error(monkeypatch):
    """The same prediction whatever Ŵ the measurement compares with."""
    W = _decaying(96, 64, 7)
    cfg = SVDConfig(rank=16, bits=4, group_size=32)
    c = lowrank(W, cfg)
    honest = registry.measure(W, cfg, compressed=c, w_hat=c.reconstruct())
    broken = registry.measure(W, cfg, compressed=c, w_hat=-c.reconstruct())  # a sign bug in the decoder
    assert broken["predicted_error"] == honest["predicted_error"]
    assert _theory(honest).passed and not _theory(broken).passed


def test_keep_has_no_theory_gate():
    m = registry.measure(torch.randn(8, 8), KeepConfig())
    assert "predicted_error" not in m and _theory(m) is None


def _contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor of TT cores (r_{k-1}, n_k, r_k), contracted left to right in float64."""
    out = cores[0].double().reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        out = out @ c.double().reshape(c.shape[0], -1)
        out = out.reshape(-1, c.shape[-1])
    return out.reshape(-1)


def test_tt_discarded_energies_are_the_error_and_within_oseledets_bound():
    W = torch.randn(256, 64, generator=torch.Generator().manual_seed(8)) @ torch.diag(torch.logspace(0, -1, 64))
    cfg = TTConfig(ranks=(1, 8, 12, 1))
    t = tt_decompose(W, cfg)
    lay = _layout(tuple(W.shape), cfg)
    X = _tensorize(W, lay).double()
    err2 = float(((X.reshape(-1) - _contract(list(t.svd_cores))) ** 2).sum())
    assert sum(t.discarded) == pytest.approx(err2, rel=1e-4)
    # Oseledets 2011, Thm 2.2: ||X - TT||^2 <= sum_k eps_k^2, eps_k the best rank-r_k error of unfolding k
    modes, bound2 = lay.modes, 0.0
    for k in range(1, len(modes)):
        s = np.linalg.svd(X.numpy().reshape(math.prod(modes[:k]), -1), compute_uv=False)
        bound2 += float((s[cfg.ranks[k]:] ** 2).sum())
    assert err2 <= bound2 * (1 + 1e-9)
    # the stored fp16 cores are exactly the sweep's cores, rounded
    for stored, raw in zip(t.cores, t.svd_cores):
        assert torch.equal(stored, raw.reshape(raw.shape[0], -1).half())


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_tt_prediction_against_the_measured_error(bits):
    W = torch.randn(256, 64, generator=torch.Generator().manual_seed(9)) * 0.02
    m = registry.measure(W, TTConfig(ranks=(1, 16, 32, 1), bits=bits))
    assert m["prediction_sides"] == "two"  # 256 x 64 factors without padding
    assert m["predicted_error"] ** 2 == pytest.approx(m["trunc_bound"] ** 2 + m["core_noise"] ** 2)
    t = _theory(m)
    assert t.passed and 0.9 < t.value < 1.1, t.value


def test_tt_padded_layout_is_checked_from_above_only():
    W = torch.randn(250, 60, generator=torch.Generator().manual_seed(10))
    m = registry.measure(W, TTConfig(ranks=(1, 4, 4, 1), row_factors=(4, 8, 8), col_factors=(4, 4, 4)))
    assert m["padded_rows"] == 6 and m["prediction_sides"] == "upper"
    assert m["rel_error"] <= m["predicted_error"] * (1 + 1e-4)
    assert _theory(m).passed


def test_tt_prediction_in_row_blocks_equals_the_whole_core_contraction(monkeypatch):
    """predicted() sums noise and contracts the right Gram a block of core rows at a time (a rank-256 core of a
    248k embedding is 670 MB in float64); the result is the one-shot einsum's."""
    import math

    import torch

    from sahc_core.methods import _tt_sweep, tt
    from sahc_core.methods.quant import QuantConfig
    from sahc_core.methods.rtn import rounding_noise_var

    g = torch.Generator().manual_seed(0)
    cores = (torch.randn(1, 12, 5, generator=g), torch.randn(5, 20, 7, generator=g), torch.randn(7, 9, 1, generator=g))
    for q in (None, QuantConfig(4, None, "sym")):
        gram, noise2 = torch.ones(1, 1, dtype=torch.float64), 0.0
        for core in reversed(cores):  # the reference: whole cores, one einsum
            c = core.to(torch.float64)
            noise2 += float((rounding_noise_var(core.reshape(core.shape[0], -1), q).reshape(c.shape)
                             * torch.diagonal(gram)).sum())
            gram = torch.einsum("aib,bc,dic->ad", c, gram, c)
        norm2 = 50.0
        got = tt.predicted(cores, (1.0, 2.0), q, norm2, padded=False)
        assert got["core_noise"] == pytest.approx(math.sqrt(noise2 / norm2), rel=1e-12)
        monkeypatch.setattr(_tt_sweep, "_PREDICT_BLOCK_BYTES", 1)  # every core cut into single rows
        small = tt.predicted(cores, (1.0, 2.0), q, norm2, padded=False)
        monkeypatch.undo()
        assert small["core_noise"] == pytest.approx(got["core_noise"], rel=1e-12)
        assert small["trunc_bound"] == got["trunc_bound"] == pytest.approx(math.sqrt(3.0 / norm2))
