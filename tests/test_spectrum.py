"""sahc_core.spectra.spectrum: singular values vs numpy float64, EYM vs truncation, stats, cache."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sahc_core.spectra import _gram
from sahc_core.spectra import spectrum as sp
from sahc_core.cache import Cache
from sahc_core.errors import ModelError
from sahc_core.io.source import ModelSource

TOL = 1e-5  # the accuracy contract: max |Δσ| / σ_max against numpy float64


def _orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _known(m: int, n: int, sigma: np.ndarray, seed: int) -> np.ndarray:
    """U diag(σ) Vᵀ with random orthogonal U (m×m) and V (n×n): σ exactly known."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    return _orthogonal(m, rng)[:, :k] @ np.diag(sigma) @ _orthogonal(n, rng)[:, :k].T


def _matrix(kind: str, m: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = min(m, n)
    if kind == "random":
        return rng.standard_normal((m, n)) * 0.02
    if kind == "rank_deficient":
        return rng.standard_normal((m, k // 3)) @ rng.standard_normal((k // 3, n))
    if kind == "decaying":  # power-law spectrum over 6 decades
        return _known(m, n, np.geomspace(10.0, 1e-5, k), seed)
    if kind == "spiked":  # noise + a few outliers (a trained-weight caricature)
        return rng.standard_normal((m, n)) + 30 * np.outer(rng.standard_normal(m), rng.standard_normal(n)) / math.sqrt(m)
    raise AssertionError(kind)


def _ref(W: np.ndarray) -> np.ndarray:
    return np.linalg.svd(np.asarray(W, dtype=np.float64), compute_uv=False)


@pytest.mark.parametrize("method", sp.METHODS)
@pytest.mark.parametrize("kind", ["random", "rank_deficient", "decaying", "spiked"])
@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (80, 80)])
def test_singular_values_match_numpy_float64(method, kind, shape):
    W32 = torch.from_numpy(_matrix(kind, *shape, seed=shape[0] + shape[1]).astype(np.float32))
    s = sp.singular_values(W32, device="cpu", method=method)
    ref = _ref(W32.numpy())  # float64 SVD of the very same float32 numbers
    assert s.dtype == np.float64 and s.shape == (min(shape),)
    assert np.all(np.diff(s) <= 0)
    assert np.max(np.abs(s - ref)) / ref[0] < TOL


@pytest.mark.parametrize("method", ["auto", "gram64", "svd64"])
def test_exactly_known_sigma(method):
    sigma = np.geomspace(3.0, 1e-7, 40)
    W = torch.from_numpy(_known(70, 40, sigma, seed=1))  # float64 input
    s = sp.singular_values(W, device="cpu", method=method)
    assert np.max(np.abs(s - sigma)) / sigma[0] < TOL
    if method == "svd64":  # the float64 path also keeps the small values relatively accurate
        assert np.max(np.abs(s - sigma) / sigma) < 1e-6


def test_gram_error_estimate_bounds_actual_error():
    for kind in ("rank_deficient", "decaying", "random"):
        W = _matrix(kind, 120, 60, seed=3).astype(np.float32)
        s, used = sp._singular_values(torch.from_numpy(W), "cpu", "gram64")
        actual = np.max(np.abs(s - _ref(W))) / s[0]
        assert used == "gram64" and actual <= sp._gram_error_estimate(s, W.shape)


def test_auto_falls_back_to_float64_svd_when_gram_estimate_too_large(monkeypatch):
    W = torch.from_numpy(_matrix("rank_deficient", 60, 30, seed=2).astype(np.float32))
    assert sp._singular_values(W, "cpu", "auto")[1] == "gram64"
    monkeypatch.setattr(sp, "_GRAM_TOL", 0.0)
    s, used = sp._singular_values(W, "cpu", "auto")
    assert used == "svd64"
    assert np.max(np.abs(s - _ref(W.numpy()))) / s[0] < 1e-12


def test_bf16_and_bad_method():
    W = torch.randn(20, 12).to(torch.bfloat16)
    ref = _ref(W.float().numpy())
    assert np.max(np.abs(sp.singular_values(W, "cpu") - ref)) / ref[0] < TOL
    with pytest.raises(ValueError, match="method"):
        sp.singular_values(W, "cpu", method="qr")


def test_as_matrix_reshapes_nd_and_says_so():
    conv = torch.randn(8, 1, 4)
    M, note = sp.as_matrix(conv)
    assert M.shape == (8, 4) and "conv1d" in note and "(8, 4)" in note
    M4, note4 = sp.as_matrix(torch.randn(6, 3, 2, 2))
    assert M4.shape == (6, 12) and "4-D" in note4
    assert sp.as_matrix(torch.randn(5, 7)) [1] is None
    s = sp.singular_values(conv, "cpu")
    assert np.allclose(s, _ref(conv.reshape(8, 4).numpy()), rtol=0, atol=TOL * s[0])
    with pytest.raises(ValueError, match="1-D"):
        sp.as_matrix(torch.randn(5))


@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
def test_eym_curve_equals_error_of_truncated_matrix(shape):
    W = _matrix("spiked", *shape, seed=5)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    e = sp.rank_error_curve(sp.singular_values(torch.from_numpy(W), "cpu"))
    assert e.shape == (min(shape) + 1,) and e[0] == pytest.approx(1.0) and e[-1] == 0.0
    for r in (0, 1, 3, 10, min(shape) - 1, min(shape)):
        W_r = (U[:, :r] * S[:r]) @ Vt[:r]
        actual = np.linalg.norm(W - W_r) / np.linalg.norm(W)
        assert e[r] == pytest.approx(actual, abs=1e-6)
    assert np.all(np.diff(e) <= 1e-15)


def test_min_rank_matches_brute_force_truncation():
    W = _matrix("decaying", 60, 40, seed=7)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    s = sp.singular_values(torch.from_numpy(W), "cpu")
    norm = np.linalg.norm(W)
    errs = [np.linalg.norm(W - (U[:, :r] * S[:r]) @ Vt[:r]) / norm for r in range(41)]
    for eps in (0.5, 0.1, 0.05, 0.01, 1e-3):
        expected = next(r for r, e in enumerate(errs) if e <= eps)
        assert sp.min_rank(s, eps) == expected


def test_min_rank_edge_cases():
    W = _matrix("rank_deficient", 60, 45, seed=4)  # rank 15
    s = _ref(W)
    assert sp.min_rank(s, 1.0) == 0 and sp.min_rank(s, 2.5) == 0
    assert sp.min_rank(s, 0.0) == 15 == np.linalg.matrix_rank(W)
    assert sp.min_rank(s, 1e-12) == 15  # never above the numerical rank
    assert sp.min_rank(np.full(5, 2.0), 0.0) == 5
    assert sp.min_rank(np.zeros(4), 0.1) == 0 and sp.rank_error_curve(np.zeros(4)).tolist() == [1.0] * 5
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            sp.min_rank(s, bad)
    ranks = [sp.min_rank(s, eps) for eps in (0.5, 0.2, 0.1, 0.01, 0.0)]
    assert ranks == sorted(ranks)


def test_stats_against_independent_computations():
    W = _matrix("spiked", 90, 60, seed=8)
    s = _ref(W)
    st = sp.spectrum_stats(s, W.shape, mean=float(W.mean()))
    assert st["sigma_max"] == pytest.approx(np.linalg.norm(W, 2))
    assert st["sigma_min"] == pytest.approx(np.linalg.norm(W, -2))
    assert st["condition_number"] == pytest.approx(np.linalg.cond(W))
    assert st["stable_rank"] == pytest.approx(np.linalg.norm(W, "fro") ** 2 / np.linalg.norm(W, 2) ** 2)
    from scipy.stats import entropy  # Roy & Vetterli: exp of the Shannon entropy of σ/Σσ
    assert st["effective_rank"] == pytest.approx(math.exp(entropy(s)))
    assert st["sigma_at_1"] == s[0] and "sigma_at_512" not in st
    assert st["energy_at_1"] == pytest.approx(s[0] ** 2 / np.sum(s**2))
    assert st["mp_variance"] == pytest.approx(W.var())
    assert st["min_rank_0.1"] == sp.min_rank(s, 0.1) and st["min_rank_frac_0.1"] == st["min_rank_0.1"] / 60
    assert st["n_above_mp"] >= 1  # the spike
    json.dumps(st, allow_nan=False)
    zero = sp.spectrum_stats(np.zeros(3), (3, 5))
    assert zero["condition_number"] is None and zero["stable_rank"] == 0.0 and zero["effective_rank"] == 0.0
    with pytest.raises(ValueError, match="singular values"):
        sp.spectrum_stats(s[:10], W.shape)


def test_marchenko_pastur_edges_match_a_simulated_random_matrix():
    rng = np.random.default_rng(0)
    m, n, var = 800, 200, 0.25
    s = _ref(rng.normal(0.0, math.sqrt(var), (m, n)))
    lo, hi = sp.marchenko_pastur_edges((m, n), var)
    assert s[0] == pytest.approx(hi, rel=0.02) and s[-1] == pytest.approx(lo, rel=0.05)
    st = sp.spectrum_stats(s, (m, n))
    assert st["n_outside_mp"] <= 3  # pure noise lives in the bulk
    assert sp.marchenko_pastur_edges((4, 4), 1.0) == (0.0, 4.0)
    with pytest.raises(ValueError):
        sp.marchenko_pastur_edges((0, 3), 1.0)


# ---------------------------------------------------------------------------- model + cache
def test_tensor_spectrum_cache_hit_and_contract(tiny_llama_dir, tmp_path):
    source = ModelSource.open(tiny_llama_dir)
    cache = Cache(tmp_path / "c.duckdb")
    name = "model.layers.0.mlp.down_proj.weight"
    first = sp.tensor_spectrum(source, name, cache=cache, device="cpu")
    second = sp.tensor_spectrum(source, name, cache=cache, device="cpu")
    assert not first.cached and second.cached and second.seconds < 0.5
    np.testing.assert_array_equal(first.singular_values, second.singular_values)
    ref = _ref(source.read(name).numpy())
    assert np.max(np.abs(first.singular_values - ref)) / ref[0] < TOL
    out = second.to_json()
    for key in ("tensor", "shape", "device", "seconds", "singular_values", "stats", "rank_error", "min_rank",
                "note", "cached", "mp"):
        assert key in out
    for key in ("sigma_max", "sigma_min", "condition_number", "stable_rank", "effective_rank"):
        assert key in out["stats"]
    assert set(out["min_rank"]) == {"0.1", "0.05", "0.01"} and out["shape"] == [64, 128]
    assert len(out["rank_error"]["ranks"]) == len(out["rank_error"]["rel_error"]) == 65
    json.dumps(out, allow_nan=False)


def test_changed_model_is_never_served_stale(tiny_llama_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    cache = Cache(tmp_path / "c.duckdb")
    name = "model.layers.1.self_attn.q_proj.weight"
    old = sp.tensor_spectrum(ModelSource.open(model), name, cache=cache)
    shard = next(f for f in model.glob("*.safetensors") if name in load_file(f))
    tensors = load_file(shard)
    tensors[name] = tensors[name] * 3.0
    save_file(tensors, shard, metadata={"format": "pt"})
    new = sp.tensor_spectrum(ModelSource.open(model), name, cache=cache)
    assert not new.cached
    np.testing.assert_allclose(new.singular_values, 3.0 * old.singular_values, rtol=1e-6)


def test_tensor_spectrum_errors(tiny_llama_dir):
    source = ModelSource.open(tiny_llama_dir)
    with pytest.raises(ModelError, match="1-D"):
        sp.tensor_spectrum(source, "model.norm.weight")
    with pytest.raises(ModelError, match="no tensor"):
        sp.tensor_spectrum(source, "nope.weight")


def test_serial_eigvalsh_restores_the_thread_count():
    before = torch.get_num_threads()
    sp.singular_values(torch.randn(30, 20), "cpu")
    assert torch.get_num_threads() == before


def test_conv1d_weight_of_qwen35_is_reshaped_and_says_so(tiny_qwen35_dir):
    source = ModelSource.open(tiny_qwen35_dir)
    name = next(t.name for t in source.tensors() if t.name.endswith("conv1d.weight"))
    C, one, K = source.info(name).shape
    res = sp.tensor_spectrum(source, name, device="cpu")
    assert one == 1 and res.shape == (C, K) and res.tensor_shape == (C, 1, K) and "conv1d" in res.note
    ref = _ref(source.read(name).reshape(C, K).double().numpy())
    assert np.max(np.abs(res.singular_values - ref)) / ref[0] < TOL
    assert res.to_json()["note"] == res.note


@pytest.mark.parametrize("shape", [(70, 30), (30, 70)])
def test_both_gram_paths_equal_numpy(shape, monkeypatch):
    monkeypatch.setattr(_gram, "_GRAM_CHUNK", 16)  # several chunks
    W = torch.from_numpy(_matrix("random", *shape, seed=9).astype(np.float32))
    A = W.double().numpy()
    ref = A.T @ A if shape[0] >= shape[1] else A @ A.T
    cpu = _gram._gram64(W).numpy()
    np.testing.assert_allclose(np.triu(cpu), np.triu(ref), rtol=0, atol=1e-14 * np.abs(ref).max())
    G = _gram._gram64_torch(W if shape[0] >= shape[1] else W.T)  # the GPU path, run on CPU
    np.testing.assert_allclose(G.numpy(), ref, rtol=0, atol=1e-14 * np.abs(ref).max())


@pytest.mark.parametrize("n,idle,threads", [(64, True, 1), (64, False, 1), (80, True, None), (80, False, 1)])
def test_eigvalsh_threads_follow_size_and_machine_load(monkeypatch, n, idle, threads):
    """Serial unless the Gram is large AND no other task is runnable; the values never change."""
    monkeypatch.setattr(_gram, "_EIGH_PARALLEL_MIN_N", 80)
    monkeypatch.setattr(_gram, "_machine_idle", lambda: idle)
    used = []
    real = _gram._cpu_threads
    monkeypatch.setattr(_gram, "_cpu_threads", lambda k: used.append(k) or real(k))
    A = torch.randn(n + 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    lam = _gram._eigvalsh(A.T @ A, adaptive_threads=True)
    assert used == [threads]
    used.clear()
    assert torch.equal(_gram._eigvalsh(A.T @ A), lam) and used == [None]  # without the opt-in: threads untouched
    assert np.allclose(lam.numpy(), np.linalg.eigvalsh((A.T @ A).numpy()), rtol=1e-10, atol=1e-9)


def test_machine_idle_reads_proc_loadavg(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open
    for text, idle in (("0.10 0.20 0.30 1/81 24230\n", True), ("2.0 1.5 1.2 50/90 1\n", False), ("garbage", False)):
        f = tmp_path / "loadavg"
        f.write_text(text)
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(f if p == "/proc/loadavg" else p, *a, **k))
        assert _gram._machine_idle() is idle
    monkeypatch.setattr(builtins, "open", real_open)


def test_big_tensors_take_the_blocked_gram_and_are_never_read_whole(tiny_qwen35_dir, monkeypatch):
    """Above io.rows.BOUNDED_MIN_BYTES a spectrum comes from row blocks: same σ and stats, no whole read."""
    from sahc_core.io import rows

    source = ModelSource.open(tiny_qwen35_dir)
    names = ["model.language_model.embed_tokens.weight", "model.language_model.layers.0.mlp.down_proj.weight",
             next(t.name for t in source.tensors() if t.name.endswith("conv1d.weight"))]
    expected = {n: sp.tensor_spectrum(source, n, device="cpu") for n in names}  # in-memory path
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)
    monkeypatch.setattr(ModelSource, "read", lambda *a, **k: pytest.fail("the whole tensor was read"))
    for n in names:
        res = sp.tensor_spectrum(source, n, device="cpu")
        ref = expected[n]
        assert res.stats["blocked"] and res.stats["within_contract"] and res.method == "gram64"
        assert res.shape == ref.shape and res.tensor_shape == ref.tensor_shape and (res.note is None) == (ref.note is None)
        assert np.max(np.abs(res.singular_values - ref.singular_values)) / ref.singular_values[0] < TOL
        for key in ("mp_variance", "mp_hi", "frobenius_norm", "stable_rank", "min_rank_0.1"):
            assert res.stats[key] == pytest.approx(ref.stats[key], rel=1e-6, abs=1e-12), key
    with pytest.raises(ValueError, match="memory bound"):
        sp.tensor_spectrum(source, names[0], device="cpu", method="svd64")
