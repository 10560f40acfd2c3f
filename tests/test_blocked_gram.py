"""Blocked Gram / singular values (sahc_core/spectra/_blocked.py) against float64 SVDs of the whole tensor."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sahc_core.errors import ModelError
from sahc_core.io import rows as rows_mod
from sahc_core.io.source import ModelSource
from sahc_core.spectra import _blocked
from sahc_core.spectra._blocked import gram_blocked, rows_per_block, singular_values_blocked, spectrum_blocked

CONTRACT = 1e-5
# Tall, wide, depthwise conv1d (C, 1, K), a 5-D Conv3d and the wide MTP fc: exact tiny_models names.
NAMES = [
    "model.language_model.embed_tokens.weight",  # (256, 64)
    "model.language_model.layers.0.mlp.down_proj.weight",  # (64, 128)
    "model.language_model.layers.0.linear_attn.conv1d.weight",  # (128, 1, 4)
    "model.visual.patch_embed.proj.weight",  # (32, 3, 2, 4, 4)
    "mtp.fc.weight",  # (64, 128)
]


def _reference(model_dir: Path, name: str) -> torch.Tensor:
    """The whole tensor as a float64 2-D view (d0, d1*...), read without the code under test."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(model_dir / index[name]), framework="pt") as fh:
        W = fh.get_tensor(name)
    return W.to(torch.float64).reshape(W.shape[0], -1)


@pytest.fixture(scope="module", params=["F32", "BF16", "F16"])
def qwen_dir(request, tiny_qwen35_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3.5 fixture, every tensor stored in the given dtype."""
    if request.param == "F32":
        return tiny_qwen35_dir
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16}[request.param]
    out = tmp_path_factory.mktemp(f"qwen_{request.param}")
    for f in tiny_qwen35_dir.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(dtype) for k, v in load_file(f).items()}, str(out / f.name), metadata={"format": "pt"})
        else:
            (out / f.name).write_bytes(f.read_bytes())
    return out


def _model_with(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> ModelSource:
    """A one-shard model directory holding ``tensors``."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return ModelSource.open(tmp_path)


def _rotated(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(σ) Vᵀ with Haar-random U (m, k), V (n, k), float64."""
    gen = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q
    return (U * sigma) @ V.T


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_gram_matches_the_product_of_the_whole_tensor(qwen_dir: Path, name: str, precision: str) -> None:
    W = _reference(qwen_dir, name)
    expected = W.T @ W if W.shape[0] >= W.shape[1] else W @ W.T
    row_bytes = W.shape[1] * (4 if precision == "float32" else 8)
    for block_bytes in (row_bytes - 1, 3 * row_bytes + 5, 1 << 30):  # less than a row (1-row blocks) .. one block
        G, shape = gram_blocked(ModelSource.open(qwen_dir), name, block_bytes=block_bytes, precision=precision)
        assert shape == tuple(W.shape)
        assert G.dtype == torch.float64 and torch.equal(G, G.T)
        tol = 1e-13 if precision == "float64" else 1e-6
        assert float((G - expected).abs().max()) <= tol * float(expected.abs().max())


@pytest.mark.parametrize("name", NAMES)
def test_singular_values_meet_the_contract_for_every_block_size(qwen_dir: Path, name: str) -> None:
    W = _reference(qwen_dir, name)
    ref = torch.linalg.svdvals(W).numpy()
    source = ModelSource.open(qwen_dir)
    for precision in ("auto", "float32", "float64"):
        for block_bytes in (7 * W.shape[1] * 4 + 1, 1 << 30):  # several (float32) rows, one block
            s = singular_values_blocked(source, name, block_bytes=block_bytes, precision=precision)
            assert s.dtype == np.float64 and s.shape == ref.shape
            assert np.all(np.diff(s) <= 0) and np.all(s >= 0)
            assert np.max(np.abs(s - ref)) / ref[0] <= CONTRACT


def test_blocks_are_read_row_ranges_and_the_tensor_never_whole(tiny_qwen35_dir: Path, monkeypatch) -> None:
    """Every read is a row range of at most rows_per_block rows; together they cover each row once."""
    name = NAMES[0]  # (256, 64) tall
    source = ModelSource.open(tiny_qwen35_dir)
    monkeypatch.setattr(ModelSource, "read", lambda *a, **k: pytest.fail("the whole tensor was read"))
    reads: list[tuple[int, int]] = []
    real = rows_mod._read_rows
    monkeypatch.setattr(rows_mod, "_read_rows", lambda p, n, a, b, c: reads.append((a, b)) or real(p, n, a, b, c))
    block_bytes = 10 * 64 * 8 + 7  # 10 float64 rows
    gram_blocked(source, name, block_bytes=block_bytes, precision="float64")
    assert rows_per_block(64, 8, block_bytes) == 10
    assert all(b - a <= 10 for a, b in reads)
    assert sorted(reads) == [(a, min(256, a + 10)) for a in range(0, 256, 10)]


def test_wide_tensor_reads_each_block_pair_once(tiny_qwen35_dir: Path, monkeypatch) -> None:
    name = NAMES[1]  # (64, 128) wide: G = WWᵀ from row-block pairs
    reads: list[tuple[int, int]] = []
    real = rows_mod._read_rows
    monkeypatch.setattr(rows_mod, "_read_rows", lambda p, n, a, b, c: reads.append((a, b)) or real(p, n, a, b, c))
    gram_blocked(ModelSource.open(tiny_qwen35_dir), name, block_bytes=2 * 16 * 128 * 8, precision="float64")
    p = 64 // 16  # 4 blocks of 16 rows (each half of block_bytes)
    assert len(reads) == p * (p + 1) // 2 and all(b - a == 16 for a, b in reads)


@pytest.mark.parametrize("name", [NAMES[0], NAMES[1]])
def test_torch_path_on_cpu_matches_blas_path(tiny_qwen35_dir: Path, name: str, monkeypatch) -> None:
    """The GPU code path (torch products), run on CPU, gives the BLAS path's Gram."""
    source = ModelSource.open(tiny_qwen35_dir)
    G_blas, _ = gram_blocked(source, name, block_bytes=3000, precision="float64")
    monkeypatch.setattr(_blocked, "_use_blas", lambda device: False)
    G_torch, _ = gram_blocked(source, name, block_bytes=3000, precision="float64")
    assert torch.equal(G_torch, G_torch.T)
    assert torch.allclose(G_torch, G_blas, rtol=0, atol=1e-13 * float(G_blas.abs().max()))


@pytest.mark.parametrize("family", ["iid", "mean", "power1.5", "rank_quarter"])
def test_float32_estimate_bounds_the_actual_error(tmp_path: Path, family: str) -> None:
    """The float32 estimate over-estimates the measured max |Δσ|/σ_max (a float64 SVD is the truth)."""
    m, n = 1536, 192
    gen = torch.Generator().manual_seed(3)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    W = {"iid": lambda: torch.randn(m, n, generator=gen, dtype=torch.float64),
         "mean": lambda: torch.randn(m, n, generator=gen, dtype=torch.float64) + 3.0,
         "power1.5": lambda: _rotated(m, n, i**-1.5),
         "rank_quarter": lambda: _rotated(m, n, (i <= n // 4).to(torch.float64))}[family]()
    W = (W * 0.02 / W.std()).to(torch.float32)
    source = _model_with(tmp_path, {"w": W})
    ref = torch.linalg.svdvals(W.double()).numpy()
    r = spectrum_blocked(source, "w", precision="float32", block_bytes=256 * n * 4)
    actual = np.max(np.abs(r.singular_values - ref)) / ref[0]
    assert r.method == "gram32" and actual <= r.error_estimate
    auto = spectrum_blocked(source, "w", precision="auto", block_bytes=256 * n * 4)
    assert np.max(np.abs(auto.singular_values - ref)) / ref[0] <= CONTRACT
    assert auto.within_contract


def test_auto_keeps_float32_for_a_well_conditioned_matrix(tmp_path: Path) -> None:
    W = (torch.randn(1536, 192, generator=torch.Generator().manual_seed(5)) * 0.02).to(torch.bfloat16)
    r = spectrum_blocked(_model_with(tmp_path, {"w": W}), "w", precision="auto")
    ref = torch.linalg.svdvals(W.double()).numpy()
    assert r.method == "gram32" and r.within_contract and r.error_estimate <= CONTRACT
    assert np.max(np.abs(r.singular_values - ref)) / ref[0] <= r.error_estimate


def test_auto_falls_back_to_float64_when_float32_misses_the_contract(tmp_path: Path) -> None:
    """A rank-16 float32 matrix: float32 products put its zero σ near √ε₃₂ σ_max, float64 ones do not."""
    W = _rotated(512, 64, torch.ones(16)).to(torch.float32)
    source = _model_with(tmp_path, {"w": W})
    ref = torch.linalg.svdvals(W.double()).numpy()
    f32 = spectrum_blocked(source, "w", precision="float32")
    assert np.max(np.abs(f32.singular_values - ref)) / ref[0] > CONTRACT and not f32.within_contract
    auto = spectrum_blocked(source, "w", precision="auto")
    assert auto.method == "gram64" and auto.within_contract
    assert np.max(np.abs(auto.singular_values - ref)) / ref[0] <= CONTRACT


def test_auto_ends_with_a_full_svd_only_when_it_fits(tmp_path: Path) -> None:
    """Flat spectrum with exact zeros (rank 64 of 128, m = 16384): even the float64 estimate exceeds 1e-6."""
    W = _rotated(16384, 128, torch.ones(64), seed=1).to(torch.float32)
    source = _model_with(tmp_path, {"w": W})
    ref = torch.linalg.svdvals(W.double()).numpy()
    r = spectrum_blocked(source, "w", precision="auto")
    assert r.method == "svd64" and r.within_contract
    assert np.max(np.abs(r.singular_values - ref)) / ref[0] <= 1e-12
    capped = spectrum_blocked(source, "w", precision="auto", svd_max_bytes=16384 * 128 * 8 - 1)
    assert capped.method == "gram64" and not capped.within_contract
    assert capped.error_estimate > 1e-6


def test_bad_input_raises_one_clear_error(tiny_qwen35_dir: Path) -> None:
    source = ModelSource.open(tiny_qwen35_dir)
    with pytest.raises(ModelError, match="1-D"):
        gram_blocked(source, "model.language_model.norm.weight")
    with pytest.raises(ModelError, match="no tensor named"):
        spectrum_blocked(source, "nope.weight")
    with pytest.raises(ValueError, match="precision"):
        gram_blocked(source, NAMES[0], precision="auto")  # the Gram itself has no fallback
    with pytest.raises(ValueError, match="block_bytes"):
        spectrum_blocked(source, NAMES[0], block_bytes=0)


@pytest.mark.slow
def test_peak_rss_is_gram_plus_a_block_not_the_tensor(tmp_path: Path) -> None:
    """A 512 MiB bf16 tensor through 16 MiB blocks: the child's peak RSS grows by far less than the tensor."""
    from tiny_models import randn_bf16

    rows, cols = 262144, 1024
    W = randn_bf16(rows, cols)
    _model_with(tmp_path, {"w": W})
    del W
    code = textwrap.dedent(f"""
        import resource, sys
        from sahc_core.io.source import ModelSource
        from sahc_core.spectra._blocked import spectrum_blocked
        src = ModelSource.open({str(tmp_path)!r})
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        spectrum_blocked(src, "w", precision="float32", block_bytes=16 * 2**20)
        print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    base_kib, peak_kib = (int(x) for x in out.stdout.split())
    tensor_mib = rows * cols * 2 / 2**20
    gram_mib = 3 * cols * cols * 8 / 2**20  # Gram, eigvalsh copy, float32 scratch (upper bound)
    grown_mib = (peak_kib - base_kib) / 1024
    # one float32 block (16 MiB) + the block as stored and as mapped (8 + 8 MiB) + allocator slack
    assert grown_mib < gram_mib + 32 + 64 < tensor_mib / 3, (grown_mib, tensor_mib)


def test_reader_remaps_the_shard_once_the_mapped_budget_is_read(tiny_qwen35_dir: Path, monkeypatch) -> None:
    """The mapping (whose touched pages count in RSS) is dropped and reopened every ~mapped_bytes read."""
    opened: list[str] = []
    real = rows_mod.safe_open
    monkeypatch.setattr(rows_mod, "safe_open", lambda path, framework: opened.append(path) or real(path, framework=framework))
    source = ModelSource.open(tiny_qwen35_dir)
    info = source.info(NAMES[0])  # (256, 64) float32: 256 bytes a row
    reader = rows_mod.RowReader(source.path / info.file, NAMES[0], 64, 256, mapped_bytes=10 * 256)
    W = _reference(tiny_qwen35_dir, NAMES[0])
    for a in range(0, 256, 4):  # 4-row reads: 2 fit a 10-row budget, the 3rd remaps
        assert torch.equal(reader.read(a, a + 4).to(torch.float64), W[a:a + 4])
    reader.close()
    assert len(opened) == math.ceil(64 / 2)
