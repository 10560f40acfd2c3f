"""A real plan end to end on tiny Qwen3.5 (vision + MTP), Gemma 3 (vision) and GPT-2; every shipped plan on every family."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sahc_core.cache import Cache
from sahc_core.errors import ModelError
from sahc_core.io.components import tensor_table
from sahc_core.io.source import ModelSource
from sahc_core.plans.assemble import read_manifest
from sahc_core.plans.plan import CompressionPlan, example_plans, resolve
from sahc_core.runs.jobs import run_status
from sahc_core.runs.pipeline import execute_run
from tiny_models import TINY_TEXT

PLAN = "plans/int4-g128.json"
WINDOW = 32


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "test.txt"
    p.write_text(TINY_TEXT, encoding="utf-8")
    return p


def _expected_smoke(source: ModelSource) -> set[str]:
    """Independent of the smoke test's module walk: the 2-D tensors of the text model (its linear and
    embedding weights: conv1d kernels are 3-D, norms and biases 1-D), plus the tied LM head."""
    table = tensor_table(source)
    text = table[~table["component"].isin(["vision", "mtp"])]
    return {r.name for r in text.itertuples() if len(r.shape) == 2} | {"lm_head.weight"}


def _zero(source: ModelSource, name: str) -> bool:
    return not bool(source.read(name).any())


@pytest.mark.parametrize("arch", ["qwen3_5", "gemma3", "gpt2"])
def test_int4_plan_end_to_end(tiny_tok_dirs, tmp_path, corpus_file, arch) -> None:
    source = ModelSource.open(tiny_tok_dirs[arch])
    cache = Cache(tmp_path / "c.duckdb")
    res = execute_run(cache, PLAN, source.path, corpus=corpus_file, window=WINDOW, device="cpu", offload="never",
                      run_id=f"e2e-{arch}")
    assert math.isfinite(res["ppl"]) and math.isfinite(res["baseline_ppl"]) and res["ppl"] != res["baseline_ppl"]
    smoke = {g["tensor"]: g for g in res["gates"] if g["gate"] == "output_cosine"}
    assert set(smoke) == _expected_smoke(source)
    assert all(g["evidence"]["tokens"] > 0 and 0.5 < g["value"] <= 1.0 + 1e-6 for g in smoke.values())
    # vision / MTP: compressed and counted in the bytes, reported as not evaluated, never smoke-tested
    table = tensor_table(source)
    parts = {c: int((table["component"] == c).sum()) for c in ("vision", "mtp") if (table["component"] == c).any()}
    ev = res["evaluation"]
    assert ev["not_evaluated"] == parts and (ev["note"] is None) == (not parts)
    not_evaluated = {n for names in ev["not_evaluated_tensors"].values() for n in names}
    assert not_evaluated.isdisjoint(smoke)
    stored = read_manifest(res["out_dir"])["tensors"]
    assert all(stored[n]["method"] == "int" and stored[n]["bytes"] > 0 for n in not_evaluated
               if len(stored[n]["shape"]) >= 2)  # really compressed (1-D tensors stay 16-bit)
    assert sum(c["n_tensors"] or 0 for c in res["components"] if c["component"] in parts) == sum(parts.values())
    # the only failing gates are per-tensor gates of tensors that are exactly zero in the random fixture
    # (zero-initialised norms, biases, Gemma's projector): rel_error is 1 there by definition (metrics.rel_error)
    failed = [g for g in res["gates"] if not g["passed"]]
    assert all(g["gate"] in ("rel_error", "theory_vs_actual") and _zero(source, g["tensor"]) for g in failed), \
        failed[:3]
    assert not res["offload"]["offload"] and res["protocol"]["dtype"] == "float32"


@pytest.mark.slow
def test_offload_always_gives_the_same_run(tiny_tok_dirs, tmp_path, corpus_file) -> None:
    """Qwen3.5 hybrid layers one at a time: the same smoke cosines and perplexities as in memory."""
    path = tiny_tok_dirs["qwen3_5"]
    runs = {mode: execute_run(Cache(tmp_path / f"{mode}.duckdb"), PLAN, path, corpus=corpus_file, window=WINDOW,
                              device="cpu", offload=mode, out_dir=tmp_path / mode) for mode in ("never", "always")}
    a, b = runs["never"], runs["always"]
    assert b["offload"]["offload"] and b["offload"]["reason"] == "always (asked for)"
    assert abs(a["ppl"] - b["ppl"]) / a["ppl"] < 1e-5 and abs(a["baseline_ppl"] - b["baseline_ppl"]) / a["ppl"] < 1e-5
    cos = {mode: {g["tensor"]: g["value"] for g in r["gates"] if g["gate"] == "output_cosine"} for mode, r in runs.items()}
    assert cos["never"].keys() == cos["always"].keys()
    assert all(abs(cos["never"][k] - cos["always"][k]) < 1e-6 for k in cos["never"])


def test_bf16_run_states_its_dtype(tiny_tok_dirs, tmp_path, corpus_file) -> None:
    res = execute_run(Cache(tmp_path / "c.duckdb"), PLAN, tiny_tok_dirs["gpt2"], corpus=corpus_file, window=WINDOW,
                      device="cpu", dtype="bfloat16")
    assert res["protocol"]["dtype"] == "bfloat16" and "bfloat16" in res["protocol"]["dtype_note"]
    assert math.isfinite(res["ppl"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        execute_run(Cache(tmp_path / "c.duckdb"), PLAN, tiny_tok_dirs["gpt2"], corpus=corpus_file, dtype="int8")


def test_names_that_do_not_map_fail_before_assembly(tiny_tok_dirs, tmp_path, corpus_file, monkeypatch) -> None:
    """Without the Qwen3.5 rules (the bug of issue 15) the run stops at once, with the names, nothing written."""
    from sahc_core.evaluate import names

    monkeypatch.setitem(names._FAMILY_OF, "qwen3_5", "decoder")
    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(ModelError, match="model.language_model.embed_tokens.weight"):
        execute_run(cache, PLAN, tiny_tok_dirs["qwen3_5"], corpus=corpus_file, run_id="bad", out_dir=tmp_path / "o")
    st = run_status(cache, "bad")
    assert st["status"] == "failed" and st["stage"] == "project" and "lacks a parameter" in st["error"]
    assert not (tmp_path / "o").exists()


def test_a_smoke_test_matching_no_layer_fails_the_run(tiny_tok_dirs, tmp_path, corpus_file, monkeypatch) -> None:
    from sahc_core.evaluate import smoke

    monkeypatch.setattr(smoke, "layer_types", lambda: (torch.nn.Conv3d,))
    cache = Cache(tmp_path / "c.duckdb")
    with pytest.raises(ModelError, match="matched no layer"):
        execute_run(cache, PLAN, tiny_tok_dirs["qwen3_5"], corpus=corpus_file, window=WINDOW, run_id="s", device="cpu")
    assert run_status(cache, "s")["stage"] == "gates"


@pytest.fixture(scope="module")
def all_fixtures(tiny_llama_dir, tiny_qwen35_dir, tiny_gemma3_dir, tiny_gpt2_dir) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "qwen3_5": tiny_qwen35_dir, "gemma3": tiny_gemma3_dir, "gpt2": tiny_gpt2_dir}


@pytest.mark.parametrize("arch", ["llama", "qwen3_5", "gemma3", "gpt2"])
def test_every_shipped_plan_resolves_with_recorded_fallbacks(all_fixtures, arch) -> None:
    source = ModelSource.open(all_fixtures[arch])
    table = tensor_table(source)
    plans = example_plans()
    assert {"int4-g128", "int4-svd-ffn", "int8", "tt-embedding"} <= set(plans)
    for plan in plans.values():
        df = resolve(plan, table, tied_embeddings=source.tied_embeddings)
        requested = getattr(plan.default, "group_size", None)
        for row in df.itertuples():
            cfg = row.config or {}
            if cfg.get("method") != "int":
                continue
            group = cfg.get("group_size")
            assert group is None or row.shape[-1] % group == 0, (plan.name, row.name, row.shape, cfg)  # divides
            if group != requested and row.rule.startswith(("default", "adapted", "fallback")):
                assert row.fallback_reason, (plan.name, row.name, row.shape, cfg)  # never a silent change
    df = resolve(CompressionPlan.from_json(PLAN), table, tied_embeddings=source.tied_embeddings).set_index("name")
    if arch == "qwen3_5":  # conv1d kernel 4: no divisor of 4 within 2x of 128 or 64 -> per row, recorded
        conv = df[df["kind"] == "conv1d"]
        assert len(conv) == 1 and conv["config"].iloc[0]["group_size"] is None
        assert "per row" in conv["fallback_reason"].iloc[0]
    if arch == "gemma3":  # vision width 48: neither 128 nor the 64 fallback divides it
        vis = df[(df["component"] == "vision") & df["shape"].map(lambda s: len(s) == 2 and s[-1] == 48)]
        assert len(vis) and vis["fallback_reason"].notna().all()
        assert all(c["group_size"] is None or 48 % c["group_size"] == 0 for c in vis["config"])


def test_whatif_output_cosine_on_qwen35(tiny_tok_dirs) -> None:
    """The What-if output cosine finds Qwen3.5's modules through the name map (linear and full attention);
    a vision tensor gets a clear error instead of a missing-module one."""
    from sahc_core.evaluate.activations import capture_inputs
    from sahc_core.evaluate.model import load_model
    from sahc_core.methods import registry
    from sahc_core.methods.quant import QuantConfig
    from sahc_core.metrics import output_cosine
    from sahc_core.whatif.measure import output_cosine_for

    source = ModelSource.open(tiny_tok_dirs["qwen3_5"])
    model = load_model(source.path, device="cpu")
    for name in ("model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
                 "model.language_model.layers.1.self_attn.q_proj.weight"):
        r = output_cosine_for(source, name, QuantConfig(4, 32), model=model, calib_text=TINY_TEXT, n_tokens=64)
        X = capture_inputs(model[0], model[1], TINY_TEXT, name.replace("language_model.", "", 1), n_tokens=64)
        W = source.read(name, dtype=torch.float32)
        W_hat = registry.compress(W, QuantConfig(4, 32)).reconstruct(torch.float32)
        assert r["output_cosine"] == pytest.approx(output_cosine(W, W_hat, X), abs=1e-6)
        assert r["block"] == name.replace("language_model.", "", 1).rsplit(".", 2)[0] and 0 < r["block_output_cosine"] <= 1
    with pytest.raises(ModelError, match="vision part"):
        output_cosine_for(source, "model.visual.blocks.0.attn.qkv.weight", QuantConfig(4, 32), model=model,
                          calib_text=TINY_TEXT, n_tokens=16)


def _family_tables():
    """The component map's table of every known family (meta-device models of test_components)."""
    from test_components import _tiny_hf_models

    from sahc_core.io.components import _table

    out = {}
    for arch, cls, cfg in _tiny_hf_models():
        with torch.device("meta"):
            model = cls(cfg)
        stored = {n: tuple(p.shape) for n, p in model.named_parameters()}  # a tied head appears once
        out[arch] = _table(((n, s, "F32", "") for n, s in stored.items()), arch, "lm_head.weight" not in stored)
    return out


def test_every_shipped_plan_resolves_on_every_known_family() -> None:
    """Llama, Mistral, Qwen2/3, Qwen3.5 (text, VLM, MoE), Gemma 3 (text, VLM), GPT-2: each shipped plan
    covers every tensor, with a stored group size that divides the width wherever int-k is used."""
    from sahc_core.io.components import KNOWN_ARCHITECTURES

    tables = _family_tables()
    assert set(tables) <= KNOWN_ARCHITECTURES and len(tables) == 10
    for arch, table in tables.items():
        for plan in example_plans().values():
            df = resolve(plan, table, tied_embeddings=bool(table["tied"].any()))
            assert len(df) == len(table), (arch, plan.name)
            for row in df.itertuples():
                cfg = row.config or {}
                if cfg.get("method") == "int" and cfg.get("group_size") is not None:
                    assert row.shape[-1] % cfg["group_size"] == 0, (arch, plan.name, row.name, row.shape)
