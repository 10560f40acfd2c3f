"""Bounded measurements of big tensors (methods/_bounded.py, _svd_bounded.py, _tt_bounded.py, io/rows.py).

Every bounded number is checked against an independent computation on the whole tensor: the
registry's float32/float64 ``measure`` of the same compressed tensor, tensorly's TT reconstruction,
the textbook tensorization of ``tt._tensorize``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sahc_core.io import rows
from sahc_core.io.source import ModelSource
from sahc_core.methods import registry
from sahc_core.methods._bounded import row_norm2_blocked
from sahc_core.methods._svd_bounded import bounded_measure as svd_bounded, gram_eig, whitened_bounded_measure
from sahc_core.methods._tt_bounded import first_chunks, row_slabs
from sahc_core.methods.hqq import HQQConfig
from sahc_core.methods.keep import KeepConfig
from sahc_core.methods.lowrank import SVDConfig, lowrank
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.tt import TTConfig, _layout, _tensorize, _tt_svd, tt_decompose
from sahc_core.methods.wsvd import WSVDConfig
from sahc_core.whatif import measure as whatif

EMB = "model.language_model.embed_tokens.weight"  # (256, 64) in the tiny Qwen3.5


class _Ctx:
    """The What-if context a bounded measurement sees (no calibration unless ``H`` is given)."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor | None = None) -> None:
        self.W, self.device, self.w_row2, self._c = W, "cpu", row_norm2_blocked(W), {}
        self.calib = None if H is None else object()
        self._H = H

    def cached(self, key, make):
        if key not in self._c:
            self._c[key] = make()
        return self._c[key]

    def xtx(self):
        return self._H

    def wHw(self):
        W = self.W.double()
        return float(((W @ self._H) * W).sum()) if self._H.dim() == 2 else float((W.square().sum(1) * self._H).sum())


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    return (torch.randn(m, n, generator=gen) * torch.logspace(0, -2, n)) @ Q


@pytest.mark.parametrize("cfg", [QuantConfig(4, 16), KeepConfig(), HQQConfig(3, 32, iters=3)])
def test_row_separable_methods_compress_rows_independently(cfg) -> None:
    """The flag's contract: compress(W)[rows] == compress(W[rows]) for every block split."""
    assert registry.spec_of(cfg).row_separable
    W = _decaying(40, 64)
    whole = registry.compress(W, cfg).reconstruct(torch.float32)
    parts = torch.cat([registry.compress(W[a:b], cfg).reconstruct(torch.float32) for a, b in ((0, 13), (13, 40))])
    assert torch.equal(whole, parts)


def test_gptq_is_row_separable_given_its_statistics() -> None:
    from sahc_core.methods.gptq import GPTQConfig

    X = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    stats = type("S", (), {"xtx": (X.T @ X).double(), "n_tokens": 300})()
    W = _decaying(40, 64)
    cfg = GPTQConfig(4, 16)
    whole = registry.compress(W, cfg, stats).reconstruct(torch.float32)
    parts = torch.cat([registry.compress(W[a:b], cfg, stats).reconstruct(torch.float32) for a, b in ((0, 17), (17, 40))])
    assert registry.spec_of(cfg).row_separable and torch.allclose(whole, parts, atol=1e-6)


@pytest.mark.parametrize("cfg", [SVDConfig(rank=16, bits=4, group_size=16), SVDConfig(rank=16, bits=None),
                                 SVDConfig(rank=50, bits=3, group_size=None), SVDConfig(rank=64, bits=8, group_size=32,
                                                                                         scheme="sym")])
@pytest.mark.parametrize("calib", [False, True])
def test_svd_from_the_gram_equals_the_registry_measure_of_the_same_factors(cfg, calib) -> None:
    """Factors U = W V / σ from the Gram, measured whole by registry.measure (float64 differences)."""
    W = _decaying(1024, 64).to(torch.bfloat16)
    X = torch.randn(200, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    H = X.T @ X if calib else None
    ctx = _Ctx(W, H)
    got = svd_bounded(W, cfg, ctx)
    lam, V = ctx.cached("svd_gram_eig", lambda: gram_eig(W))
    Wf = W.float()
    S = lam.sqrt()
    U = (Wf.double() @ V / S).float()
    stats = None if H is None else type("S", (), {"xtx": H})()
    ref = registry.measure(Wf, cfg, compressed=lowrank(Wf, cfg, factors=(U, S.float(), V.T.float())), calib=stats)
    for key in ("rel_error", "weight_cosine", "eym_error", "bytes"):
        assert got[key] == pytest.approx(ref[key], rel=2e-5, abs=1e-7), key
    # fp16 factors leave ‖W_r − Ŵ‖ ~ 3e-4 ‖W‖, where float32 rounding of W_r (1e-7 ‖W‖) is 5e-4 of it
    assert got["quant_error"] == pytest.approx(ref["quant_error"], rel=2e-5 if cfg.bits else 2e-3), "quant_error"
    assert got["trunc_error"] == pytest.approx(ref["trunc_error"], rel=1e-3, abs=1e-6)
    if calib:
        assert got["output_error"] == pytest.approx(ref["output_error"], rel=2e-5)
    plain = registry.measure(Wf, cfg)  # the float32 thin SVD: other rounding of the same factors
    assert got["rel_error"] == pytest.approx(plain["rel_error"], rel=2e-3)


@pytest.mark.parametrize("shape,rf,cf", [((256, 64), (4, 8, 8), (4, 4, 4)), ((250, 60), (4, 8, 8), (3, 4, 5)),
                                         ((250, 60), (16, 16), (6, 10))])
def test_streamed_first_unfolding_is_the_tensorization(shape, rf, cf) -> None:
    """Chunks of M1 built from W's rows equal the textbook padded, interleaved tensor (tt._tensorize)."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    cfg = TTConfig(ranks=(1,) + (4,) * (len(rf) - 1) + (1,), row_factors=rf, col_factors=cf)
    lay = _layout(shape, cfg)
    M1 = _tensorize(W, lay).reshape(lay.modes[0], -1)
    got = torch.zeros_like(M1)
    for a, b, C in first_chunks(W, rf, cf):
        got[:, a:b] = C
    assert torch.equal(got, M1)


@pytest.mark.parametrize("shape,ranks", [((256, 64), (1, 8, 8, 1)), ((250, 60), (1, 6, 12, 1)), ((250, 60), (1, 9, 1))])
def test_streamed_tt_and_row_slabs_match_the_whole_tensor_paths(shape, ranks) -> None:
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    cfg = TTConfig(ranks=ranks)
    c = tt_decompose(W.to(torch.bfloat16), cfg)
    lay = _layout(shape, cfg)
    old, old_discarded = _tt_svd(_tensorize(W.to(torch.bfloat16), lay), lay.ranks)  # the float32 tensorization path
    # the streamed first step discards the same energies δ_k² (the TT theory gate's prediction)
    assert c.discarded == pytest.approx(old_discarded, rel=1e-3, abs=1e-6 * float(W.square().sum()))
    full = c.reconstruct()
    from tensorly.tt_matrix import tt_matrix_to_tensor
    import tensorly as tl

    with tl.backend_context("pytorch"):
        ref = tt_matrix_to_tensor([g.reshape(g.shape[0], i, j, g.shape[-1]) for g, i, j in
                                   zip(old, lay.row_factors, lay.col_factors)])
    P, Q = math.prod(lay.row_factors), math.prod(lay.col_factors)
    ref = ref.reshape(P, Q)[: shape[0], : shape[1]]
    assert torch.allclose(full, ref, atol=2e-3 * float(ref.abs().max()))  # fp16 cores either way
    slabs = torch.zeros_like(full)
    for a, b, S in row_slabs(c):
        slabs[a:b] = S
    assert torch.allclose(slabs, full, atol=1e-5)


@pytest.fixture
def bounded_dir(tmp_path: Path) -> Path:
    """A one-tensor llama-named model whose 'embedding' (1024, 64) is bf16."""
    W = _decaying(1024, 64, seed=5).to(torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1024, "hidden_size": 64}))
    save_file({"model.embed_tokens.weight": W, "model.norm.weight": torch.ones(64, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


@pytest.mark.parametrize("cfg", [QuantConfig(4, 16), KeepConfig(), HQQConfig(4, 32, iters=2),
                                 SVDConfig(rank=16, bits=None), TTConfig(ranks=(1, 8, 8, 1))])
def test_measure_tensor_bounded_equals_the_in_memory_path(bounded_dir: Path, monkeypatch, cfg) -> None:
    name = "model.embed_tokens.weight"
    source = ModelSource.open(bounded_dir)
    expected = whatif.measure_tensor(source, name, cfg, device="cpu")
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)
    monkeypatch.setattr(ModelSource, "read", lambda *a, **k: pytest.fail("the whole tensor was read"))
    got = whatif.measure_tensor(source, name, cfg, device="cpu")
    assert got["bytes"] == expected["bytes"]
    tol = 2e-3 if isinstance(cfg, SVDConfig) else 1e-5  # float32 SVD vs the Gram's eigenvectors
    for key in ("rel_error", "weight_cosine"):
        assert got[key] == pytest.approx(expected[key], rel=tol, abs=1e-7), key


def test_methods_without_a_bounded_path_are_refused_naming_the_bound(bounded_dir: Path, monkeypatch) -> None:
    source = ModelSource.open(bounded_dir)
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)
    no_path = dataclasses.replace(registry.get("wsvd"), measure_bounded=None)  # every built-in has one
    with pytest.raises(ValueError, match=r"memory bound.*int"):
        whatif._measure_fn(no_path, source, "model.embed_tokens.weight")
    assert rows.memory_bound(source) == int(2.5 * 2 * 1024 * 64 + 1.5e9)


def test_read_stored_is_the_tensor_in_its_dtype(bounded_dir: Path) -> None:
    source = ModelSource.open(bounded_dir)
    got = rows.read_stored(source, "model.embed_tokens.weight", window_bytes=3000)  # many remaps
    assert got.dtype == torch.bfloat16 and torch.equal(got, source.read("model.embed_tokens.weight"))


@pytest.mark.slow
def test_bounded_measure_peak_rss_is_the_stored_tensor_plus_blocks(tmp_path: Path) -> None:
    """A 256 MiB bf16 embedding measured by int4, SVD and TT: the peak grows by about the stored tensor."""
    from tiny_models import randn_bf16

    m, n = 131072, 1024
    W = randn_bf16(m, n, scale=0.02)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"model.embed_tokens.weight": W}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    del W
    code = textwrap.dedent(f"""
        import resource
        from sahc_core.io import rows
        from sahc_core.io.source import ModelSource
        from sahc_core.methods.quant import QuantConfig
        from sahc_core.methods.lowrank import SVDConfig
        from sahc_core.methods.tt import TTConfig
        from sahc_core.whatif.measure import measure_tensor
        rows.BOUNDED_MIN_BYTES = 0
        src = ModelSource.open({str(tmp_path)!r})
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for cfg in (QuantConfig(4, 128), SVDConfig(rank=64, bits=4, group_size=128), TTConfig(ranks=(1, 32, 32, 1))):
            measure_tensor(src, "model.embed_tokens.weight", cfg, device="cpu")
        print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    base_kib, peak_kib = (int(x) for x in out.stdout.split())
    grown_mib = (peak_kib - base_kib) / 1024
    stored_mib = m * n * 2 / 2**20
    # the in-memory path holds >= 12 bytes per weight (3 GiB here); bounded: the stored tensor + a few blocks
    assert grown_mib < stored_mib + 5 * 64 + 128, grown_mib


@pytest.mark.parametrize("cfg", [SVDConfig(rank=16, bits=4, group_size=16), SVDConfig(rank=20, bits=None),
                                 SVDConfig(rank=24, bits=3, group_size=None, scheme="sym")])
def test_svd_compress_of_a_big_tensor_stores_the_factors_its_bounded_measure_measured(monkeypatch, cfg) -> None:
    """Assembly's Gram-path factors: exact bytes, and their Ŵ has the bounded measurement's errors."""
    W = _decaying(512, 64, seed=6).to(torch.bfloat16)
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)
    c = registry.compress(W, cfg)
    assert c.u_f32 is None and c.nbytes == registry.projected_bytes(W.shape, cfg)
    got = svd_bounded(W, cfg, _Ctx(W))
    ref = registry.measure(W.float(), cfg, compressed=c, w_hat=c.reconstruct(torch.float32))
    for key in ("rel_error", "weight_cosine"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key
    loaded = registry.load_compressed(c.state(), c.meta())
    assert torch.equal(loaded.reconstruct(), c.reconstruct())


def test_output_cosine_refuses_a_model_whose_float32_copy_breaks_the_bound(bounded_dir: Path, monkeypatch) -> None:
    source = ModelSource.open(bounded_dir)
    monkeypatch.setattr(rows, "BOUND_OVERHEAD_BYTES", 0)  # a one-tensor model: the bound becomes 2 bytes per weight,
    monkeypatch.setattr(rows, "BOUND_FACTOR", 1.0)        # below its float32 copy (4 bytes per weight)
    with pytest.raises(ValueError, match="memory bound"):
        whatif.output_cosine_for(source, "model.embed_tokens.weight", QuantConfig(4, 16))


def test_gates_stage_of_big_tensors_is_blocked_and_equal(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    """A run's gates stage measures a tensor above the bound a block of rows at a time (W in its stored dtype,
    Ŵ rebuilt per block: no 12 GB of float32 copies of a 248k embedding) with the numbers of the whole path,
    for every stored format: int-k (RTN sym / asym, GPTQ-style Tagged wrappers), kept, low-rank, Tensor-Train."""
    from sahc_core.io.source import ModelSource
    from sahc_core.plans.assemble import assemble
    from sahc_core.plans.plan import CompressionPlan
    from sahc_core.runs.pipeline import measure_checkpoint

    plan = CompressionPlan.from_dict({
        "name": "mixed", "default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "asym"},
        "components": {"embedding": {"method": "tt", "tt_ranks": [1, 8, 8, 1], "bits": 8},
                       "ffn": {"method": "svd", "rank_fraction": 0.25, "bits": 4, "group_size": 32}},
        "overrides": [{"pattern": "*norm*", "method": "keep"},
                      {"pattern": "*q_proj*", "method": "int", "bits": 3, "group_size": None, "scheme": "sym"},
                      {"pattern": "*o_proj*", "method": "keep"}]})
    src = ModelSource.open(tiny_llama_dir)
    out = assemble(src, plan, tmp_path / "run")["out_dir"]
    _, whole, shapes = measure_checkpoint(src, out)
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)  # every tensor takes the bounded path
    import sahc_core.methods._bounded as bounded

    calls = []
    real = bounded.compare_rebuilt
    monkeypatch.setattr(bounded, "compare_rebuilt", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    gates, blocked, shapes2 = measure_checkpoint(src, out)
    assert shapes2 == shapes and {"int", "keep", "svd", "tt"} <= set(calls)
    for w, b in zip(whole, blocked):
        assert w["name"] == b["name"]
        assert b["rel_error"] == pytest.approx(w["rel_error"], rel=1e-5, abs=1e-7), w["name"]
        assert b["weight_cosine"] == pytest.approx(w["weight_cosine"], rel=1e-6), w["name"]
    theory = {g.tensor for g in gates if g.gate == "theory_vs_actual"}
    assert any("q_proj" in t for t in theory)  # int-k keeps its prediction on the bounded path


def test_checkpoint_weights_read_big_tensors_as_another_dtype_in_blocks(tiny_llama_dir, monkeypatch) -> None:
    """The layer loader's read of a big tensor in the evaluation dtype, block by block, is the plain cast."""
    from sahc_core.evaluate.weights import CheckpointWeights
    from sahc_core.io.source import ModelSource

    src = ModelSource.open(tiny_llama_dir)
    name = "model.embed_tokens.weight"
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)
    monkeypatch.setattr(rows, "DEFAULT_BLOCK_BYTES", 4096)  # many blocks
    w = CheckpointWeights(src)
    for dtype in (torch.float32, torch.bfloat16):
        got = w.read_as(name, dtype)
        assert got.dtype == dtype and torch.equal(got, src.read(name).to(dtype))


_WSVD_CFGS = [WSVDConfig(rank=16, bits=4, group_size=16), WSVDConfig(rank=16, bits=None),
              WSVDConfig(rank=24, bits=3, group_size=None, scheme="sym")]


def _stats(m: int = 200, n: int = 64, seed: int = 2):
    """``XᵀX`` of correlated inputs (a decaying spectrum, so whitening matters) and its calibration stand-in."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(m, n, generator=gen, dtype=torch.float64) @ torch.diag(torch.logspace(0, -1.5, n, dtype=torch.float64))
    H = X.T @ X
    return H, type("Stats", (), {"xtx": H})()


@pytest.mark.parametrize("cfg", _WSVD_CFGS)
def test_whitened_svd_from_the_gram_equals_the_in_memory_whitened_svd(cfg) -> None:
    """``Sᵀ G S``'s eigenvectors give the factors of the float64 SVD of ``W S`` (the in-memory kernel)."""
    W = _decaying(1024, 64).to(torch.bfloat16)
    H, stats = _stats()
    got = whitened_bounded_measure(W, cfg, _Ctx(W, H))
    Wf = W.float()
    ref = registry.measure(Wf, cfg, compressed=registry.compress(Wf, cfg, stats), calib=stats)
    assert got["bytes"] == ref["bytes"] and got["rank"] == ref["rank"] == cfg.rank
    for key in ("rel_error", "weight_cosine", "output_error"):
        assert got[key] == pytest.approx(ref[key], rel=2e-3, abs=1e-7), key
    assert got["whitened_eym_error"] == pytest.approx(ref["whitened_eym_error"], rel=1e-4)
    # and it is the whitened truncation, not plain SVD's: a lower output error at the same rank
    plain = registry.measure(Wf, SVDConfig(rank=cfg.rank, bits=cfg.bits, group_size=cfg.group_size,
                                           scheme=cfg.scheme), calib=stats)
    assert got["output_error"] < plain["output_error"]


@pytest.mark.parametrize("cfg", _WSVD_CFGS[:2])
def test_wsvd_compress_of_a_big_tensor_stores_the_factors_its_bounded_measure_measured(monkeypatch, cfg) -> None:
    """Assembly's Gram-path whitened factors: exact bytes, and their Ŵ has the bounded measurement's errors."""
    W = _decaying(512, 64, seed=6).to(torch.bfloat16)
    H, stats = _stats(seed=3)
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)
    c = registry.compress(W, cfg, stats)
    assert c.nbytes == registry.projected_bytes(W.shape, cfg)
    got = whitened_bounded_measure(W, cfg, _Ctx(W, H))
    ref = registry.measure(W.float(), cfg, compressed=c, w_hat=c.reconstruct(torch.float32), calib=stats)
    for key in ("rel_error", "weight_cosine", "output_error"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5), key
    loaded = registry.load_compressed(c.state(), c.meta())
    assert torch.equal(loaded.reconstruct(), c.reconstruct())
