"""Tests of the method registry: dispatch, exact bytes, plan JSON round-trips, measure numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sahc_core.methods.keep import KeepConfig
from sahc_core.methods.registry import (
    Compressed,
    compress,
    config_from_dict,
    config_to_dict,
    load_compressed,
    measure,
    projected_bytes,
)
from sahc_core.metrics import rel_error, row_cosine
from sahc_core.methods.lowrank import SVDConfig
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.tt import TTConfig

CONFIGS = [
    KeepConfig(),
    KeepConfig("float16"),
    QuantConfig(4, 32, "asym"),
    QuantConfig(3, None, "sym"),
    QuantConfig(2, 16, "asym"),
    QuantConfig(5, 32, "sym"),
    QuantConfig(8, None, "asym"),
    SVDConfig(rank=3, bits=None),
    SVDConfig(rank_fraction=0.5, bits=4, group_size=None, scheme="sym"),
    SVDConfig(rank=2, bits=3, group_size=32),
    TTConfig(ranks=(1, 2, 2, 1)),
    TTConfig(ranks=(1, 3, 1), bits=8),
    TTConfig(ranks=(1, 2, 2, 1), bits=4, group_size=2, scheme="sym"),
]
SHAPES = [(32, 64), (7, 96), (2, 3, 32), (64,)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
@pytest.mark.parametrize("shape", SHAPES)
def test_projected_bytes_equal_actual_and_roundtrip(cfg, shape: tuple) -> None:
    torch.manual_seed(sum(shape))
    W = torch.randn(shape)
    try:
        projected = projected_bytes(shape, cfg)
    except ValueError:  # the formula refuses exactly what compress refuses
        with pytest.raises(ValueError):
            compress(W, cfg)
        return
    c = compress(W, cfg)
    assert isinstance(c, Compressed)
    stored = sum(t.numel() * t.element_size() for t in c.state().values())
    assert projected == c.nbytes == stored
    meta = json.loads(json.dumps(c.meta()))  # meta is JSON-able
    back = load_compressed({k: v.clone() for k, v in c.state().items()}, meta)
    assert back.shape == tuple(shape) and back.nbytes == c.nbytes
    assert torch.equal(back.reconstruct(), c.reconstruct())


@pytest.mark.parametrize("cfg", CONFIGS, ids=repr)
def test_config_dict_roundtrip(cfg) -> None:
    d = config_to_dict(cfg)
    assert config_from_dict(json.loads(json.dumps(d))) == cfg


def test_config_from_plan_forms() -> None:
    assert config_from_dict({"method": "int", "bits": 4, "group_size": 128, "scheme": "asym"}) == QuantConfig(4, 128, "asym")
    assert config_from_dict({"method": "int", "group_size": None}) == QuantConfig(4, None)
    assert config_from_dict({"method": "keep"}) == KeepConfig()
    assert config_from_dict({"method": "svd", "rank": 64, "bits": 4, "group_size": 128}) == SVDConfig(rank=64)
    assert config_from_dict({"method": "svd", "rank_fraction": 0.25, "bits": None}) == SVDConfig(rank_fraction=0.25, bits=None)
    with pytest.raises(ValueError, match="exactly one"):
        config_from_dict({"method": "svd"})
    with pytest.raises(ValueError, match="unknown compression method"):
        config_from_dict({"method": "zip"})
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"method": "int", "bitz": 4})
    with pytest.raises(ValueError, match="'method' key"):
        config_from_dict({"bits": 4})
    with pytest.raises(ValueError, match="bits must be"):
        config_from_dict({"method": "int", "bits": 1})
    with pytest.raises(ValueError, match="unknown compression config"):
        compress(torch.ones(2, 2), {"method": "int"})


def test_load_rejects_mismatched_state() -> None:
    c = compress(torch.randn(8, 32), QuantConfig(4, 32))
    bad = dict(c.state())
    bad.pop("zeros")
    with pytest.raises(ValueError, match="exactly"):
        load_compressed(bad, c.meta())
    k = compress(torch.randn(8, 32), KeepConfig())
    with pytest.raises(ValueError, match="'weight'"):
        load_compressed({"weight": torch.randn(8, 32)}, k.meta())


def _np_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(a.ravel()))


def _np_rowcos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_metrics_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((20, 30))
    b = a + 0.3 * rng.standard_normal((20, 30))
    assert rel_error(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(_np_rel(a, b), rel=1e-12)
    assert row_cosine(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(_np_rowcos(a, b), rel=1e-12)


def test_error_metric_edge_cases() -> None:
    W = torch.randn(4, 8)
    assert rel_error(W, torch.zeros_like(W)) == pytest.approx(1.0)
    assert rel_error(torch.zeros(3, 3), torch.zeros(3, 3)) == 1.0  # zero matrix: 1.0 by definition
    assert row_cosine(W, W) == pytest.approx(1.0)
    assert row_cosine(W, -W) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(W, W.T)


@pytest.mark.parametrize("cfg", [QuantConfig(4, 32), QuantConfig(8, None, "sym"), KeepConfig()], ids=repr)
def test_measure_numbers(cfg) -> None:
    torch.manual_seed(3)
    W = torch.randn(16, 64)
    m = measure(W, cfg)
    W_hat = compress(W, cfg).reconstruct().numpy()
    assert m["bytes"] == projected_bytes(W.shape, cfg)
    assert m["ratio"] == pytest.approx(2 * W.numel() / m["bytes"])
    assert m["bits_per_weight"] == pytest.approx(8 * m["bytes"] / W.numel())
    assert m["rel_error"] == pytest.approx(_np_rel(W.numpy().astype(np.float64), W_hat.astype(np.float64)), rel=1e-6)
    assert m["weight_cosine"] == pytest.approx(_np_rowcos(W.numpy().astype(np.float64), W_hat.astype(np.float64)), rel=1e-6)
    assert 0 < m["rel_error"] < 0.2 and m["weight_cosine"] > 0.98


def test_keep_float16_overflow_is_refused() -> None:
    W = torch.tensor([[1e5, 1.0]])
    with pytest.raises(ValueError, match="overflows float16"):
        compress(W, KeepConfig("float16"))
    assert torch.equal(compress(W, KeepConfig()).reconstruct(), W.to(torch.bfloat16).float())


def test_float32_metrics_accumulate_accurately() -> None:
    """Large float32 inputs: per-row float32 sums + float64 across rows match numpy float64 to 1e-6."""
    rng = np.random.default_rng(9)
    a = rng.standard_normal((1500, 2000)).astype(np.float32)
    b = (a + 0.01 * rng.standard_normal(a.shape)).astype(np.float32)
    A, B = a.astype(np.float64), b.astype(np.float64)
    assert rel_error(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(_np_rel(A, B), rel=1e-6)
    assert row_cosine(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(_np_rowcos(A, B), rel=1e-6)
