"""Tests of sahc_core.methods.tt against tensorly's TT-matrix decomposition and numpy reconstructions."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import tensor_train_matrix
from tensorly.tt_matrix import tt_matrix_to_tensor

from sahc_core.methods.registry import load_compressed, measure, projected_bytes
from sahc_core.methods.quant import QuantConfig, quant_bytes
from sahc_core.methods.tt import TTConfig, suggest_factors, tt_bytes, tt_decompose, tt_ranks_for_error


def _tl_reference(W: torch.Tensor, rf: tuple, cf: tuple, ranks: tuple) -> torch.Tensor:
    """tensorly TT-matrix of the zero-padded matrix, reconstructed and cut back to W's shape."""
    P, Q = math.prod(rf), math.prod(cf)
    Wp = torch.nn.functional.pad(W.double(), (0, Q - W.shape[1], 0, P - W.shape[0]))
    with tl.backend_context("pytorch"):
        f = tensor_train_matrix(Wp.reshape(*rf, *cf), list(ranks))
        return tt_matrix_to_tensor(f).reshape(P, Q)[: W.shape[0], : W.shape[1]]


def _structured(V: int, d: int, seed: int) -> torch.Tensor:
    """A matrix with decaying structure (so TT at moderate ranks is accurate) plus noise."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(V, 6, generator=g) @ torch.randn(6, d, generator=g)
    return A + 0.05 * torch.randn(V, d, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("V,d,rf,cf,ranks", [
    (96, 24, (4, 4, 6), (2, 3, 4), (1, 4, 6, 1)),
    (90, 24, (4, 4, 6), (2, 3, 4), (1, 8, 8, 1)),     # 6 padded rows
    (64, 20, (4, 4, 4), (3, 3, 3), (1, 3, 5, 1)),      # padded columns too
    (120, 16, (2, 3, 4, 5), (2, 2, 2, 2), (1, 4, 8, 4, 1)),
])
def test_matches_tensorly(seed: int, V: int, d: int, rf: tuple, cf: tuple, ranks: tuple) -> None:
    W = _structured(V, d, seed)
    cfg = TTConfig(ranks=ranks, row_factors=rf, col_factors=cf)
    c = tt_decompose(W, cfg)
    ref = _tl_reference(W, rf, cf, ranks)
    W_hat = c.reconstruct()
    assert W_hat.shape == W.shape
    err_ref = float((ref - W.double()).norm() / W.double().norm())
    m = measure(W, cfg, compressed=c)
    assert m["rel_error"] == pytest.approx(err_ref, rel=1e-3, abs=1e-4)  # fp16 cores add ~1e-4
    assert torch.allclose(W_hat.double(), ref, atol=2e-3 * float(ref.abs().max()))
    assert m["tt_shape"] == {"row_factors": list(rf), "col_factors": list(cf), "ranks": list(ranks)}
    assert m["padded_rows"] == math.prod(rf) - V and m["padded_cols"] == math.prod(cf) - d
    # fp16 bytes = 2 * sum of core sizes (numpy-independent count)
    sizes = [ranks[k] * rf[k] * cf[k] * ranks[k + 1] for k in range(len(rf))]
    assert m["bytes"] == 2 * sum(sizes) == tt_bytes((V, d), cfg) == c.nbytes


def test_rows_match_full_reconstruction() -> None:
    W = _structured(90, 24, 3)
    c = tt_decompose(W, TTConfig(ranks=(1, 8, 8, 1), row_factors=(4, 4, 6), col_factors=(2, 3, 4)))
    full = c.reconstruct()
    idx = [0, 5, 89, 17, 17, 64]
    torch.testing.assert_close(c.rows(idx), full[idx], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.rows(torch.arange(90)), full, rtol=1e-5, atol=1e-6)
    assert c.rows([]).shape == (0, 24)
    with pytest.raises(ValueError, match="row indices"):
        c.rows([90])


def test_full_ranks_are_exact_and_error_shrinks() -> None:
    W = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    errs = []
    for r in [(1, 2, 2, 1), (1, 4, 4, 1), (1, 8, 8, 1), (1, 8, 16, 1)]:
        errs.append(measure(W, TTConfig(ranks=r, row_factors=(4, 4, 4), col_factors=(2, 2, 4)))["rel_error"])
    assert all(a > b for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-3  # full TT ranks: exact up to fp16 storage


@pytest.mark.parametrize("bits,group_size,scheme", [(8, None, "asym"), (4, 8, "sym"), (3, None, "asym")])
def test_quantized_cores_bytes_and_roundtrip(bits: int, group_size, scheme: str) -> None:
    W = _structured(96, 24, 5)
    rf, cf, ranks = (4, 4, 6), (2, 3, 4), (1, 4, 8, 1)
    cfg = TTConfig(ranks=ranks, bits=bits, row_factors=rf, col_factors=cf, group_size=group_size, scheme=scheme)
    c = tt_decompose(W, cfg)
    q = QuantConfig(bits, group_size, scheme)
    expect = sum(quant_bytes((ranks[k], rf[k] * cf[k] * ranks[k + 1]), q) for k in range(3))
    assert projected_bytes(W.shape, cfg) == c.nbytes == expect
    back = load_compressed({k: v.clone() for k, v in c.state().items()}, c.meta())
    assert torch.equal(back.reconstruct(), c.reconstruct())
    fp16 = measure(W, TTConfig(ranks=ranks, row_factors=rf, col_factors=cf))["rel_error"]
    assert measure(W, cfg, compressed=c)["rel_error"] >= fp16 - 1e-4


def test_default_factors_and_padding() -> None:
    assert suggest_factors(49152, 3) == (32, 32, 48)
    assert suggest_factors(576, 3) == (8, 8, 9)
    for n, parts in [(50257, 3), (997, 2), (4096, 4), (7, 3), (101, 3), (61, 2)]:
        f = suggest_factors(n, parts)
        P = math.prod(f)
        assert len(f) == parts and P >= n and list(f) == sorted(f)
        assert max(f) <= 2 * math.ceil(P ** (1 / parts))
        if P - n < 200 and n < 2000:  # brute force: no smaller P >= n has an admissible split
            for smaller in range(n, P):
                cap = 2 * math.ceil(smaller ** (1 / parts) - 1e-9)
                assert not any(math.prod(t) == smaller for t in itertools.product(range(1, cap + 1), repeat=parts))
            # and no admissible split of P has a smaller largest factor
            cap = 2 * math.ceil(P ** (1 / parts) - 1e-9)
            best = min(max(t) for t in itertools.product(range(1, cap + 1), repeat=parts) if math.prod(t) == P)
            assert max(f) == best
    W = _structured(97, 16, 6)  # 97 is prime -> padded rows
    c = tt_decompose(W, TTConfig(ranks=(1, 4, 8, 1)))
    rf = c.tt_shape["row_factors"]
    assert math.prod(rf) >= 97 and c.padded_rows == math.prod(rf) - 97
    assert c.reconstruct().shape == (97, 16)
    ref = _tl_reference(W, tuple(rf), tuple(c.tt_shape["col_factors"]), (1, 4, 8, 1))
    assert measure(W, TTConfig(ranks=(1, 4, 8, 1)))["rel_error"] == pytest.approx(
        float((ref - W.double()).norm() / W.norm()), rel=1e-3)


def test_rank_validation() -> None:
    shape = (64, 16)
    kw = dict(row_factors=(4, 4, 4), col_factors=(2, 2, 4))
    with pytest.raises(ValueError, match=r"r1=9 is more than the unfolding allows .*at most 8"):
        tt_bytes(shape, TTConfig(ranks=(1, 9, 4, 1), **kw))
    with pytest.raises(ValueError, match=r"r2=17 .*at most 16"):
        tt_decompose(torch.randn(shape), TTConfig(ranks=(1, 8, 17, 1), **kw))
    for bad in [(2, 4, 4, 1), (1, 4, 4, 2), (1, 0, 4, 1), (1, 1), (1, 4.5, 1)]:
        with pytest.raises(ValueError, match="tt ranks"):
            TTConfig(ranks=bad)
    with pytest.raises(ValueError, match="row_factors must hold 3"):
        TTConfig(ranks=(1, 4, 4, 1), row_factors=(8, 8))
    with pytest.raises(ValueError, match="multiply to at least"):
        tt_bytes(shape, TTConfig(ranks=(1, 4, 4, 1), row_factors=(2, 2, 2), col_factors=(2, 2, 4)))
    with pytest.raises(ValueError, match="2-D"):
        tt_bytes((4, 4, 4), TTConfig())
    with pytest.raises(ValueError, match="must divide the row length"):
        tt_bytes(shape, TTConfig(ranks=(1, 4, 4, 1), bits=4, group_size=7, **kw))


def test_error_target_ranks() -> None:
    W = _structured(96, 24, 7)
    kw = dict(row_factors=(4, 4, 6), col_factors=(2, 3, 4))
    for eps in (0.3, 0.1, 0.02):
        ranks = tt_ranks_for_error(W, eps, **kw)
        assert ranks[0] == ranks[-1] == 1 and len(ranks) == 4
        err = float((_tl_reference(W, kw["row_factors"], kw["col_factors"], ranks) - W.double()).norm() / W.norm())
        assert err <= eps + 1e-6
    with pytest.raises(ValueError, match="error target"):
        tt_ranks_for_error(W, 0.0)


def test_config_dict_forms() -> None:
    from sahc_core.methods.registry import config_from_dict, config_to_dict

    cfg = config_from_dict({"method": "tt", "tt_ranks": [1, 64, 64, 1], "bits": 8})
    assert cfg == TTConfig(ranks=(1, 64, 64, 1), bits=8)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    full = TTConfig(ranks=(1, 4, 1), row_factors=(4, 8), col_factors=(2, 2), bits=4, group_size=8, scheme="sym")
    assert config_from_dict(config_to_dict(full)) == full
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"method": "tt", "ranks": [1, 4, 1]})


def test_numpy_row_contraction() -> None:
    """Row p of the TT-matrix equals the numpy product of the core slices along its multi-index."""
    W = _structured(24, 12, 8)
    c = tt_decompose(W, TTConfig(ranks=(1, 3, 1), row_factors=(4, 6), col_factors=(3, 4)))
    G = [g.numpy().astype(np.float64) for g in c.float_cores()]
    for p in (0, 7, 23):
        a1, a2 = divmod(p, 6)
        row = np.einsum("xr,ry->xy", G[0][0, a1], G[1][:, a2, :, 0]).reshape(-1)
        np.testing.assert_allclose(c.rows([p])[0].numpy(), row, rtol=1e-5, atol=1e-6)
