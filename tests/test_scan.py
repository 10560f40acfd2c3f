"""sahc_core.spectra.scan: every 2-D weight, tidy rows, progress, resume after an interruption."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sahc_core.spectra import spectrum as sp
from sahc_core.cache import Cache
from sahc_core.io.components import tensor_table
from sahc_core.io.source import ModelSource
from sahc_core.spectra.scan import cached_scan, scan


class _Stop(Exception):
    pass


@pytest.fixture()
def llama(tiny_llama_dir):
    return ModelSource.open(tiny_llama_dir)


def _count_computations(monkeypatch) -> list[int]:
    calls = [0]
    original = sp._singular_values

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sp, "_singular_values", counting)
    return calls


def test_scan_every_2d_weight_with_progress(llama):
    table = tensor_table(llama)
    expected = sorted(table.loc[table["shape"].map(len) >= 2, "name"])
    seen = []
    df = scan(llama, device="cpu", progress=lambda done, total, name, eta: seen.append((done, total, name, eta)))
    assert sorted(df["name"]) == expected and not df["name"].str.contains("norm").any()
    assert [s[0] for s in seen] == list(range(1, len(expected) + 1)) and {s[1] for s in seen} == {len(expected)}
    assert all(eta is not None and eta >= 0 for *_, eta in seen) and seen[-1][3] == 0
    for col in ("name", "component", "kind", "layer", "shape", "sigma_max", "stable_rank", "effective_rank",
                "min_rank_0.1", "n_outside_mp", "cached"):
        assert col in df.columns
    row = df.set_index("name").loc["model.layers.1.mlp.up_proj.weight"]
    assert row["component"] == "ffn" and row["kind"] == "up_proj" and row["layer"] == 1
    s = np.linalg.svd(llama.read("model.layers.1.mlp.up_proj.weight").double().numpy(), compute_uv=False)
    assert row["sigma_max"] == pytest.approx(s[0], rel=1e-6) and row["min_rank_0.1"] == sp.min_rank(s, 0.1)


def test_scan_one_component_and_bad_component(llama):
    df = scan(llama, component="attention_full", device="cpu")
    assert set(df["component"]) == {"attention_full"} and set(df["kind"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(ValueError, match="component"):
        scan(llama, component="vision")


def test_interrupted_scan_resumes_with_only_the_rest(llama, tmp_path, monkeypatch):
    cache = Cache(tmp_path / "c.duckdb")
    calls = _count_computations(monkeypatch)

    def stop_after_three(done, total, name, eta):
        if done == 3:
            raise _Stop

    with pytest.raises(_Stop):
        scan(llama, cache=cache, device="cpu", progress=stop_after_three)
    assert calls[0] == 3 and len(cached_scan(llama, cache)) == 3
    df = scan(llama, cache=cache, device="cpu")
    total = len(df)
    assert calls[0] == total and int(df["cached"].sum()) == 3
    warm = scan(llama, cache=cache, device="cpu")
    assert calls[0] == total and warm["cached"].all()
    cold = df.drop(columns=["cached", "seconds", "compute_seconds"]).reset_index(drop=True)
    again = warm.drop(columns=["cached", "seconds", "compute_seconds"]).reset_index(drop=True)
    assert cold.equals(again)


def test_batched_scan_on_cpu_equals_the_one_by_one_scan(tiny_qwen35_dir, tmp_path):
    """The CUDA path's CPU fallback: same-shape stacks (several batches per shape) give the same rows."""
    from sahc_core.spectra import batched

    source = ModelSource.open(tiny_qwen35_dir)
    serial = scan(source, device="cpu")
    cache = Cache(tmp_path / "c.duckdb")
    got = scan(source, cache=cache, device="cpu", batch=True, batch_bytes=40_000)  # 1-3 matrices a batch
    assert (got["batched"] >= 1).all() and (got["batched"] < 4).any()
    keep = [c for c in serial.columns if c not in ("cached", "seconds", "compute_seconds")]
    for col in keep:
        a, b = serial[col], got[col]
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b.to_numpy(float), a.to_numpy(float), rtol=1e-9, err_msg=col)
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), col
    assert sorted(cached_scan(source, cache)["name"]) == sorted(serial["name"])
    assert batched.matrices_per_batch((4096, 12288), 2, 2**31) == 2**31 // (4096 * 12288 * 2 + 2048 * 4096 * 8
                                                                           + 3 * 4096 * 4096 * 8)


def test_batched_singular_values_match_numpy_and_fall_back_per_matrix(monkeypatch):
    from sahc_core.spectra import batched
    from sahc_core.spectra.batched import batched_singular_values

    # between the estimates of a full-rank Gaussian (~1e-13) and one with ten zero σ (~1e-7)
    monkeypatch.setattr(batched, "_GRAM_TOL", 1e-9)
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 20, 50, generator=gen)
    flat = torch.zeros(2, 50, 20)
    flat[0] = torch.randn(50, 20, generator=gen)
    flat[1, :, :10] = torch.randn(50, 10, generator=gen)  # σ = 0 ten times: its Gram estimate is the larger
    for stack in (wide, flat):
        s, methods = batched_singular_values(stack, "cpu")
        ref = np.linalg.svd(stack.double().numpy(), compute_uv=False)
        assert s.shape == ref.shape and np.max(np.abs(s - ref) / ref[:, :1]) < 1e-5
    assert methods == ["gram64", "svd64"]


def test_eta_uses_the_measured_time_per_shape():
    from sahc_core.spectra.scan import Eta

    eta = Eta([(8, 4), (8, 4), (8, 4), (16, 8)])
    assert eta.remaining() is None
    eta.done((8, 4), 2.0)
    eta.done((8, 4), 4.0)
    # one (8, 4) left at its mean 3 s; (16, 8) unseen: 3 s per 8*4*4 flops scaled to 16*8*8
    assert eta.remaining() == pytest.approx(3.0 + 3.0 * (16 * 8 * 8) / (8 * 4 * 4))
    primed = Eta([(16, 8)], prior={(16, 8): [10.0]})
    assert primed.remaining() == 10.0 and primed.seconds_each((8, 4)) is None


def test_scan_status_says_what_is_done_and_how_long_the_rest_takes(llama, tmp_path, monkeypatch, capsys):
    from sahc_core.cli.main import main
    from sahc_core.spectra.scan import scan_status

    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(_Stop):
        scan(llama, cache=cache, device="cpu",
             progress=lambda done, total, name, eta: (_ for _ in ()).throw(_Stop()) if done == 4 else None)
    st = scan_status(llama, cache, device="cpu")
    done = cached_scan(llama, cache)
    assert st["done"] == 4 == len(done) and len(st["todo"]) == st["total"] - 4
    assert set(st["todo"]).isdisjoint(done["name"])
    per = {tuple(r["shape"]): r for r in st["shapes"]}
    measured = done.groupby(done["shape"].map(tuple))["compute_seconds"].mean()
    for shape, secs in measured.items():
        assert per[shape]["seconds_each"] == pytest.approx(secs)
    todo_shapes = [tuple(llama.info(n).shape) for n in st["todo"]]
    assert st["eta_seconds"] == pytest.approx(sum(per[s]["estimated_seconds"] for s in todo_shapes))
    assert main(["scan", "--status", "--model", str(llama.path), "--cache", str(tmp_path / "c.duckdb"), "--json",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["done"] == 4 and out["todo"] == st["todo"]
