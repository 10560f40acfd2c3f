"""sahc_core.spectra.scan: every 2-D weight, tidy rows, progress, resume after an interruption."""
from __future__ import annotations

import numpy as np
import pytest

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
