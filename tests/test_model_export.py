"""Tests of sahc_core.plans.export: each export loads with transformers alone and gives the run's weights.

Reference everywhere: ``assemble.load_assembled`` (the weights the run evaluated) and
``evaluate.perplexity`` of the source model with those weights loaded, same windows.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sahc_core.cache import Cache, to_json
from sahc_core.errors import JobError, ModelError, SahcError
from sahc_core.evaluate.model import load_model
from sahc_core.evaluate.perplexity import PplConfig, perplexity
from sahc_core.io.source import ModelSource
from sahc_core.methods.quant import QuantConfig, quantize, unpack_codes
from sahc_core.plans.assemble import assemble, load_assembled, read_manifest
from sahc_core.plans.export import ExportRefused, export_checkpoint, export_run
from sahc_core.plans.plan import CompressionPlan
from tiny_models import TINY_TEXT

PPL = PplConfig(window=32, device="cpu")
NORMS = {"pattern": "*norm*", "method": "keep"}
#: int4 sym g32 (group), int8 sym per row (channel) on o_proj, int8 embedding (stored dense), norms kept
SYM = CompressionPlan.from_dict({
    "name": "sym", "default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "sym"},
    "components": {"embedding": {"method": "int", "bits": 8, "group_size": None, "scheme": "sym"}},
    "overrides": [NORMS, {"pattern": "*o_proj*", "method": "int", "bits": 8, "group_size": None, "scheme": "sym"}]})
#: every exact GGML type: Q4_1 default, Q4_0 up_proj, Q5_1 down_proj, Q5_0 q/k/v/o, Q8_0 embedding
GGUF = CompressionPlan.from_dict({
    "name": "ggml", "default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "asym"},
    "components": {"embedding": {"method": "int", "bits": 8, "group_size": 32, "scheme": "sym"},
                   "attention_full": {"method": "int", "bits": 5, "group_size": 32, "scheme": "sym"}},
    "overrides": [NORMS, {"pattern": "*down_proj*", "method": "int", "bits": 5, "group_size": 32, "scheme": "asym"},
                  {"pattern": "*up_proj*", "method": "int", "bits": 4, "group_size": 32, "scheme": "sym"}]})
MIXED = CompressionPlan.from_dict({
    "name": "mixed", "default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "sym"},
    "components": {"ffn": {"method": "svd", "rank_fraction": 0.25, "bits": 4, "group_size": 32},
                   "embedding": {"method": "tt", "tt_ranks": [1, 8, 8, 1], "bits": 8}},
    "overrides": [NORMS, {"pattern": "*v_proj*", "method": "int", "bits": 4, "group_size": 32, "scheme": "asym"}]})
ASYM = CompressionPlan.from_dict({"name": "asym", "default": {"method": "int", "bits": 8, "group_size": None},
                                  "overrides": [NORMS]})


@pytest.fixture(scope="module")
def model_dir(tiny_llama_tok_dir: Path) -> Path:
    return tiny_llama_tok_dir


@pytest.fixture(scope="module")
def runs(model_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """One assembled checkpoint per plan (read-only)."""
    root = tmp_path_factory.mktemp("runs")
    src = ModelSource.open(model_dir)
    return {p.name: Path(assemble(src, p, root / p.name)["out_dir"]) for p in (SYM, GGUF, MIXED, ASYM)}


def _ppl(model, model_dir: Path) -> float:
    from transformers import AutoTokenizer

    return perplexity(model.eval(), AutoTokenizer.from_pretrained(model_dir), TINY_TEXT, PPL).ppl


def _reference_ppl(model_dir: Path, run: Path) -> float:
    model, tok = load_model(model_dir, device="cpu", state_dict=load_assembled(run))
    return perplexity(model, tok, TINY_TEXT, PPL).ppl


def _load(out: Path, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype, **kw).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses on the first forward
    return model


def _differing(model, ref: dict[str, torch.Tensor]) -> list[str]:
    sd = model.state_dict()
    return [n for n, t in ref.items() if not torch.equal(sd[n], t.to(sd[n].dtype))]


def test_compressed_tensors_holds_the_runs_codes_and_loads_bit_for_bit(runs, model_dir, tmp_path):
    run = runs["sym"]
    res = export_checkpoint(run, model_dir, tmp_path / "ct", "compressed-tensors", dtype="float32")
    out = Path(res["out"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    schemes = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"]): len(g["targets"])
               for g in qc["config_groups"].values()}
    assert schemes == {(4, "group", 32): 12, (8, "channel", None): 2}
    assert all(g["weights"]["symmetric"] for g in qc["config_groups"].values())
    # the stored codes ARE the run's codes, read back independently of the export code
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    manifest = read_manifest(run)
    name = "model.layers.1.self_attn.o_proj"
    e = manifest["tensors"][name + ".weight"]
    with safe_open(str(run / e["file"]), framework="pt") as fh:
        codes, scales = fh.get_tensor(e["state_keys"]["codes"]), fh.get_tensor(e["state_keys"]["scales"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        packed, stored_scale = fh.get_tensor(name + ".weight_packed"), fh.get_tensor(name + ".weight_scale")
        assert fh.get_tensor(name + ".weight_shape").tolist() == e["shape"]
    want = unpack_codes(codes, 8, 64 * 64).to(torch.int16).reshape(64, 64) - 127
    assert packed.dtype == torch.int32 and torch.equal(unpack_from_int32(packed, 8, torch.Size([64, 64])).to(torch.int16), want)
    assert stored_scale.dtype == torch.float16 and torch.equal(stored_scale, scales)
    # transformers alone, float32: every tensor bit for bit (the embedding is dense float32 here)
    ref = load_assembled(run)
    model = _load(out)
    assert _differing(model, ref) == []
    assert _ppl(model, out) == _reference_ppl(model_dir, run)
    assert list(res["dense_fallback"]) == ["model.embed_tokens.weight"]
    assert "nn.Embedding" in res["dense_fallback"]["model.embed_tokens.weight"]
    assert len(res["packed"]) == 14 and res["overhead"]["zero_point_bytes"] == 0
    assert res["overhead"]["weight_shape_bytes"] == 14 * 16


def test_compressed_tensors_exact_dtype_conditions(runs, model_dir, tmp_path):
    """Packed weights are exact in float16 too (the fp16 scale is exact, one rounding of the exact
    product) but not in bfloat16 (the scale is rounded to bfloat16 first)."""
    run = runs["sym"]
    out = Path(export_checkpoint(run, model_dir, tmp_path / "ct", "compressed-tensors")["out"])
    packed = [n for n, e in read_manifest(run)["tensors"].items() if e["method"] == "int" and "embed" not in n]
    fp16 = load_assembled(run, dtype=torch.float16)
    assert _differing(_load(out, torch.float16), {n: fp16[n] for n in packed}) == []
    bf16 = load_assembled(run, dtype=torch.bfloat16)
    assert _differing(_load(out, torch.bfloat16), {n: bf16[n] for n in packed})
    # default dtype bfloat16: the int8 embedding is stored dense in bfloat16, perplexity within 0.1 %
    assert _ppl(_load(out), out) == pytest.approx(_reference_ppl(model_dir, run), rel=1e-3)


def test_asym_has_no_exact_compressed_tensors_form():
    """The evidence for refusing asym: an integer zero point -z/s is rarely an integer, and
    compressed-tensors' (q - zp) * s with the best float zero point is not q * s + z bit for bit."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    torch.manual_seed(0)
    W = torch.randn(64, 128) * 0.05
    q = quantize(W, QuantConfig(4, 32, "asym"))
    codes = unpack_codes(q.codes, 4, W.numel()).to(torch.float32).reshape(64, 128)
    s, z = q.scales.float(), q.zeros.float()
    assert ((-z / s) == (-z / s).round()).float().mean() < 0.05
    zp = -z / s - 8  # (c - zp) * s with c = q - 8 is q * s + z in exact arithmetic
    ct = dequantize((codes - 8).to(torch.int8), s, zp, QuantizationArgs(num_bits=4, symmetric=False, group_size=32,
                                                                        zp_dtype=torch.float32))
    assert (ct != q.reconstruct()).float().mean() > 0.2
    assert torch.allclose(ct, q.reconstruct(), atol=1e-6)


def test_refusals_write_nothing(runs, model_dir, tmp_path):
    with pytest.raises(ExportRefused, match='int8 asym.*"scheme": "sym"'):
        export_checkpoint(runs["asym"], model_dir, tmp_path / "a", "compressed-tensors")
    with pytest.raises(ExportRefused, match="store model.embed_tokens.weight exactly: the plan quantizes it int4 sym "
                                            "with groups of 64"):
        plan = CompressionPlan.from_dict({"name": "g64", "default": {"method": "int", "bits": 4, "group_size": 64,
                                                                     "scheme": "sym"}, "overrides": [NORMS]})
        export_checkpoint(assemble(ModelSource.open(model_dir), plan, tmp_path / "g64")["out_dir"], model_dir,
                          tmp_path / "b", "gguf")
    with pytest.raises(ExportRefused, match="int8 asym with one group per row of 64"):
        export_checkpoint(runs["asym"], model_dir, tmp_path / "c", "gguf")
    keep = assemble(ModelSource.open(model_dir), CompressionPlan.from_dict({"name": "k", "default": {"method": "keep"}}),
                    tmp_path / "keep")["out_dir"]
    with pytest.raises(ExportRefused, match="no nn.Linear weight"):
        export_checkpoint(keep, model_dir, tmp_path / "d", "compressed-tensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g64", "keep"]


def test_compressed_tensors_writes_an_asym_embedding_dense(model_dir, tmp_path):
    """asym is refused only where it would be packed: an asym int8 embedding is written dense anyway."""
    d = SYM.to_dict()
    plan = CompressionPlan.from_dict({**d, "components": {"embedding": {"method": "int", "bits": 8, "group_size": None,
                                                                        "scheme": "asym"}}})
    run = assemble(ModelSource.open(model_dir), plan, tmp_path / "r")["out_dir"]
    res = export_checkpoint(run, model_dir, tmp_path / "ct", "compressed-tensors", dtype="float32")
    assert list(res["dense_fallback"]) == ["model.embed_tokens.weight"] and len(res["packed"]) == 14
    assert _differing(_load(Path(res["out"])), load_assembled(run)) == []


def test_gguf_refuses_other_architectures(tiny_qwen35_dir, tmp_path):
    keep = CompressionPlan.from_dict({"name": "k", "default": {"method": "keep"}})
    run = assemble(ModelSource.open(tiny_qwen35_dir), keep, tmp_path / "q", device="cpu")["out_dir"]
    with pytest.raises(ExportRefused, match="llama architecture only.*'qwen3_5'"):
        export_checkpoint(run, tiny_qwen35_dir, tmp_path / "g", "gguf")


def test_mixed_plan_dense_float32_is_exact_and_sharded(runs, model_dir, tmp_path):
    run = runs["mixed"]
    res = export_checkpoint(run, model_dir, tmp_path / "d", "dense", dtype="float32", shard_bytes=40_000)
    out = Path(res["out"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards) and shards[-1].endswith(
        f"-of-{len(shards):05d}.safetensors")
    for shard in shards:  # a shard stays under the limit unless one tensor alone is larger (as in save_pretrained)
        names = [n for n, f in index["weight_map"].items() if f == shard]
        with safe_open(str(out / shard), framework="pt") as fh:
            payload = sum(fh.get_tensor(n).nbytes for n in names)
        assert payload <= 40_000 or len(names) == 1
    ref = load_assembled(run)
    assert set(index["weight_map"]) == set(ref) - {"lm_head.weight"} and res["tensors"] == len(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for n, t in ref.items() if n != "lm_head.weight")
    model = _load(out)
    assert _differing(model, ref) == []
    assert _ppl(model, out) == _reference_ppl(model_dir, run)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(res["files"]) and "sahc_conversion.json" not in res["files"]
    # bfloat16 (default): each reconstruction rounded once
    bf = export_checkpoint(run, model_dir, tmp_path / "b", "dense")
    bf16 = load_assembled(run, dtype=torch.bfloat16)
    assert _differing(_load(Path(bf["out"]), torch.bfloat16), bf16) == []
    assert bf["bytes_weights"] < res["bytes_weights"] / 1.9


def test_compressed_tensors_stores_svd_and_tt_dense_with_the_cost(runs, model_dir, tmp_path):
    run = runs["mixed"]
    with pytest.raises(ExportRefused, match="v_proj"):  # asym v_proj
        export_checkpoint(run, model_dir, tmp_path / "x", "compressed-tensors")
    plan = CompressionPlan.from_dict({**MIXED.to_dict(), "overrides": [NORMS]})
    run = assemble(ModelSource.open(model_dir), plan, tmp_path / "m")["out_dir"]
    res = export_checkpoint(run, model_dir, tmp_path / "ct", "compressed-tensors")
    manifest = read_manifest(run)
    lowrank = {n for n, e in manifest["tensors"].items() if e["method"] in ("svd", "tt")}
    assert set(res["dense_fallback"]) == lowrank and len(res["packed"]) == 8
    extra = sum(2 * torch.Size(manifest["tensors"][n]["shape"]).numel() - manifest["tensors"][n]["bytes"] for n in lowrank)
    assert res["overhead"]["dense_fallback_bytes"] == extra
    assert any("low-rank or tensor-train" in n and "bfloat16" in n for n in res["notes"])
    f32, bf16 = load_assembled(run), load_assembled(run, dtype=torch.bfloat16)
    ref = {n: bf16[n] if n in lowrank else t for n, t in f32.items()}
    assert _differing(_load(Path(res["out"])), ref) == []  # dense bf16 upcast exactly, packed exact in float32


def test_gguf_every_exact_type_loads_bit_for_bit(runs, model_dir, tmp_path):
    import gguf

    run = runs["ggml"]
    res = export_checkpoint(run, model_dir, tmp_path / "g", "gguf")
    assert res["ggml_types"] == {"Q8_0": 1, "Q4_0": 2, "Q4_1": 2, "Q5_0": 8, "Q5_1": 2, "F32": 5}
    out = Path(res["out"])
    reader = gguf.GGUFReader(out / "model.gguf")
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied head, as llama.cpp reads it
    ref = load_assembled(run)
    model = _load(out, gguf_file="model.gguf")
    assert model.config.tie_word_embeddings and _differing(model, ref) == []  # q/k rows un-permuted exactly
    assert _ppl(model, out) == _reference_ppl(model_dir, run)
    assert res["bytes_weights"] < res["bytes_run"]


def test_gguf_stores_svd_and_tt_dense(runs, model_dir, tmp_path):
    plan = CompressionPlan.from_dict({**MIXED.to_dict(), "overrides": [NORMS]})
    run = assemble(ModelSource.open(model_dir), plan, tmp_path / "m")["out_dir"]
    seen = []
    res = export_checkpoint(Path(run) / "manifest.json", model_dir, tmp_path / "g", "gguf",
                            progress=lambda d, t, n: seen.append((d, t)))
    assert res["ggml_types"] == {"Q4_0": 8, "BF16": 7, "F32": 5} and seen[-1] == (20, 20) and len(seen) == 20
    assert any("SVD/TT" in n for n in res["notes"])
    f32, bf16 = load_assembled(run), load_assembled(run, dtype=torch.bfloat16)
    lowrank = {n for n, e in read_manifest(run)["tensors"].items() if e["method"] in ("svd", "tt")}
    ref = {n: bf16[n] if n in lowrank else t for n, t in f32.items()}
    assert _differing(_load(Path(res["out"]), gguf_file="model.gguf"), ref) == []


def test_existing_output_force_and_protected_paths(runs, model_dir, tiny_qwen35_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    export_checkpoint(runs["mixed"], model_dir, out, "dense")  # an empty directory is used
    with pytest.raises(SahcError, match="not empty.*force=True"):
        export_checkpoint(runs["sym"], model_dir, out, "compressed-tensors")
    res = export_checkpoint(runs["sym"], model_dir, out, "compressed-tensors", force=True)
    assert "quantization_config" in json.loads((out / "config.json").read_text()) and res["out"] == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    with pytest.raises(SahcError, match="would replace"):
        export_checkpoint(runs["sym"], model_dir, runs["sym"].parent, "dense", force=True)
    with pytest.raises(ModelError, match="not the model this checkpoint was assembled from"):
        export_checkpoint(runs["sym"], tiny_qwen35_dir, tmp_path / "x", "dense")


def test_disk_full_leaves_no_complete_looking_directory(runs, model_dir, tmp_path, monkeypatch):
    import sahc_core.plans.export as ex

    out = tmp_path / "o"
    export_checkpoint(runs["sym"], model_dir, out, "dense")
    before = {p.name: p.stat().st_size for p in out.iterdir()}
    calls = []

    def full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(tensors, path, metadata=metadata)

    save = ex.save_file
    monkeypatch.setattr(ex, "save_file", full)
    for fmt in ("dense", "compressed-tensors"):
        calls.clear()
        with pytest.raises(SahcError, match="disk is full.*free disk space"):
            export_checkpoint(runs["sym"], model_dir, tmp_path / "new", fmt, shard_bytes=20_000)
        calls.clear()
        with pytest.raises(SahcError, match="disk is full"):
            export_checkpoint(runs["sym"], model_dir, out, fmt, force=True, shard_bytes=20_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no new dir, no hidden temp dir
    assert {p.name: p.stat().st_size for p in out.iterdir()} == before  # the old export is untouched


def test_export_run_checks_the_run_row(runs, model_dir, tmp_path):
    cache = Cache(tmp_path / "c.duckdb")
    ok = {"out_dir": str(runs["sym"]), "model_path": str(model_dir), "bytes_actual": 1, "ppl": 2.0}
    rows = [("done1", "done", ok, None), ("run1", "running", None, None), ("bad1", "failed", None, "boom"),
            ("gone", "done", {**ok, "out_dir": str(tmp_path / "deleted")}, None)]
    for rid, status, result, err in rows:
        cache.execute("INSERT INTO runs (run_id, status, result, error, model_path) VALUES (?, ?, ?, ?, ?)",
                      [rid, status, to_json(result) if result else None, err, str(model_dir)])
    res = export_run(cache, "done1", tmp_path / "e", "dense")
    assert res["run_id"] == "done1" and res["run_ppl"] == 2.0 and Path(res["out"], "model.safetensors").is_file()
    with pytest.raises(JobError, match="no run with id"):
        export_run(cache, "nope", tmp_path / "x", "dense")
    with pytest.raises(JobError, match="still running"):
        export_run(cache, "run1", tmp_path / "x", "dense")
    with pytest.raises(JobError, match=r"bad1 failed \(boom\)"):
        export_run(cache, "bad1", tmp_path / "x", "dense")
    with pytest.raises(JobError, match=r"were deleted; re-create them .*python -m sahc_core run --plan"):
        export_run(cache, "gone", tmp_path / "x", "dense")
    assert not (tmp_path / "x").exists()


def test_cli_export_of_a_run_and_its_refusals(runs, model_dir, tmp_path, capsys):
    """`python -m sahc_core export --run ID --format F --out DIR --json`: the dense export in the run's own
    dtype (auto = float32 here) loads with transformers and equals the assembled weights; a non-empty
    output directory is refused with exit 2 unless --force; an asym plan is refused for compressed-tensors."""
    import json

    from sahc_core.cli.main import main
    from sahc_core.plans.assemble import load_assembled

    cache = Cache(tmp_path / "c.duckdb")
    ok = {"out_dir": str(runs["sym"]), "model_path": str(model_dir), "bytes_actual": 1, "ppl": 2.0,
          "protocol": {"dtype": "float32"}}
    cache.execute("INSERT INTO runs (run_id, status, result, model_path) VALUES ('r1', 'done', ?, ?)",
                  [to_json(ok), str(model_dir)])
    argv = ["export", "--run", "r1", "--format", "dense", "--out", str(tmp_path / "d"), "--cache", str(cache.path),
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["format"] == "dense" and out["dtype"] == "float32" and out["bytes"] > 0
    ref = load_assembled(runs["sym"])
    assert _differing(_load(Path(out["out"])), ref) == []
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_gptq_codes_export_like_rtn_codes(model_dir, tmp_path):
    """GPTQ stores the int-k format (MethodSpec.storage "int-k"): its sym codes pack into compressed-tensors and
    its Q4_0 blocks into GGUF, and both load bit for bit as the run's weights (float32)."""
    from sahc_core.calib.store import CalibConfig, calibration_stats

    src = ModelSource.open(model_dir)
    calib = calibration_stats(src, Cache(tmp_path / "c.duckdb"), TINY_TEXT, CalibConfig(tokens=96, heldout_tokens=16,
                                                                                         window=32), device="cpu")
    plan = CompressionPlan.from_dict({"name": "gptq-sym", "default": {"method": "gptq", "bits": 4, "group_size": 32,
                                                                      "scheme": "sym"},
                                      "components": {"embedding": {"method": "keep"}}, "overrides": [NORMS]})
    run = Path(assemble(src, plan, tmp_path / "run", calib=calib)["out_dir"])
    ref = load_assembled(run)
    res = export_checkpoint(run, model_dir, tmp_path / "ct", "compressed-tensors", dtype="float32")
    assert len(res["packed"]) == 14 and not res["dense_fallback"]
    assert _differing(_load(Path(res["out"])), ref) == []
    gg = export_checkpoint(run, model_dir, tmp_path / "gguf", "gguf", dtype="float32")
    assert gg["ggml_types"].get("Q4_0") == 14
