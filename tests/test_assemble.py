"""Tests of sahc_core.plans.assemble: streaming write, exact bytes, round-trip, atomicity, shape gate."""
from __future__ import annotations

import errno
import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sahc_core.methods import registry as methods
from sahc_core.plans.assemble import AssemblyCancelled, assemble, load_assembled, read_manifest, shape_gate
from sahc_core.errors import ModelError, SahcError
from sahc_core.io.source import ModelSource
from sahc_core.plans.plan import CompressionPlan

INT4 = CompressionPlan.from_dict({
    "name": "int4-g32", "default": {"method": "int", "bits": 4, "group_size": 32, "scheme": "asym"},
    "components": {"embedding": {"method": "int", "bits": 8, "group_size": None}},
    "overrides": [{"pattern": "*.norm*", "method": "keep", "dtype": "float16"}],
})
INT8 = CompressionPlan.from_dict({"name": "int8", "default": {"method": "int", "bits": 8, "group_size": None}})


def _header_len(path) -> int:
    """8-byte little-endian length prefix + JSON header (safetensors format spec), read independently."""
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def _check_round_trip(src: ModelSource, plan: CompressionPlan, out) -> dict:
    res = assemble(src, plan, out, shard_bytes=8 * 1024, device="cpu")  # compared with CPU compress below
    manifest = read_manifest(out)
    state = load_assembled(out)
    matched, total, mism = shape_gate(src, state)
    assert (matched, total, mism) == (len(src.tensors()), len(src.tensors()), [])
    for name, e in manifest["tensors"].items():
        W = src.read(name, dtype=torch.float32)
        expect = methods.compress(W, methods.config_from_dict(e["config"])).reconstruct(torch.float32)
        assert torch.equal(state[name], expect), name
        assert e["bytes"] == e["bytes_projected"] == methods.projected_bytes(tuple(W.shape), methods.config_from_dict(e["config"]))
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == res["files"] and len(files) > 1
    payload = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            payload += sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())
    assert res["bytes_payload"] == payload == res["bytes_projected"]
    assert res["bytes_actual"] == sum(f.stat().st_size for f in files)
    assert res["overhead_bytes"] == res["bytes_actual"] - res["bytes_payload"] == sum(_header_len(f) for f in files)
    assert res["projection_mismatches"] == []
    assert res["n_tensors"] == len(src.tensors())
    return res


def test_llama_round_trip_exact_bytes_and_manifest(tiny_llama_dir, tmp_path):
    src = ModelSource.open(tiny_llama_dir)
    out = tmp_path / "out"
    res = _check_round_trip(src, INT4, out)
    m = read_manifest(out)
    assert m["source"]["fingerprint"] == src.fingerprint
    assert {"sahc_core", "torch", "transformers", "safetensors"} <= set(m["versions"])
    assert CompressionPlan.from_dict(m["plan"]) == INT4
    norm = m["tensors"]["model.norm.weight"]
    assert norm["method"] == "keep" and norm["meta"]["config"]["dtype"] == "float16"
    assert set(m["tensors"]["model.layers.0.mlp.up_proj.weight"]["state_keys"]) == {"codes", "scales", "zeros"}
    assert res["ratio_projected"] == pytest.approx(res["bytes_original"] / res["bytes_projected"])
    assert not list(tmp_path.glob("out.tmp-*"))


def test_qwen35_round_trip_all_tensor_kinds(tiny_qwen35_dir, tmp_path):
    # conv1d (3-D), vision patch embedding (5-D), MTP shard, biases: all through the same path
    _check_round_trip(ModelSource.open(tiny_qwen35_dir), INT8, tmp_path / "q")


def test_round_trip_with_svd_ffn_and_tt_embedding(tiny_llama_dir, tmp_path):
    plan = CompressionPlan.from_dict({
        "name": "mixed", "default": {"method": "int", "bits": 4, "group_size": 32},
        "components": {"ffn": {"method": "svd", "rank_fraction": 0.25, "bits": 4, "group_size": 32},
                       "embedding": {"method": "tt", "tt_ranks": [1, 8, 8, 1], "bits": 8}},
    })
    res = _check_round_trip(ModelSource.open(tiny_llama_dir), plan, tmp_path / "m")
    assert {t["method"] for t in res["tensors"]} == {"int", "svd", "tt", "keep"}


def test_assembled_state_loads_into_the_transformers_model(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    assemble(ModelSource.open(tiny_llama_dir), INT8, tmp_path / "o")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama_dir))
    missing, unexpected = model.load_state_dict(load_assembled(tmp_path / "o"), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}


def test_actual_and_projected_ratio_agree_within_one_percent(tmp_path):
    # Headers are ~100 bytes per state tensor, so the 1 % bound needs real-sized matrices.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    plan = CompressionPlan.from_dict({"name": "g128", "default": {"method": "int", "bits": 4, "group_size": 128}})
    res = assemble(ModelSource.open(tmp_path / "m"), plan, tmp_path / "o")
    assert res["bytes_payload"] == res["bytes_projected"]
    assert 0 < res["overhead_bytes"] < 0.01 * res["bytes_payload"]
    assert res["ratio_gap"] == pytest.approx(abs(res["ratio_actual"] / res["ratio_projected"] - 1))
    assert res["ratio_gap"] < 0.01


def test_tied_lm_head_stored_twice_is_written_once(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model_dir)
    src0 = ModelSource.open(model_dir)
    emb = src0.read("model.embed_tokens.weight")
    save_file({"lm_head.weight": emb.clone()}, str(model_dir / "head.safetensors"))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    src = ModelSource.open(model_dir)
    res = assemble(src, INT8, tmp_path / "o")
    assert next(t for t in res["tensors"] if t["name"] == "lm_head.weight")["bytes"] == 0
    assert res["bytes_original"] == 2 * (src.num_params - emb.numel())
    state = load_assembled(tmp_path / "o")
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert shape_gate(src, state)[2] == []


def test_disk_full_leaves_nothing_and_raises_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    import sahc_core.plans.assemble as asm

    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(asm, "save_file", full_disk)
    out = tmp_path / "o"
    with pytest.raises(SahcError, match="No space left on device.*free disk space"):
        assemble(ModelSource.open(tiny_llama_dir), INT8, out, shard_bytes=4096)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ModelError, match="not a finished assembly"):
        load_assembled(out)


def test_cancel_and_existing_output(tiny_llama_dir, tmp_path):
    src = ModelSource.open(tiny_llama_dir)
    polls = iter(range(100))
    with pytest.raises(AssemblyCancelled, match="after 3 of 20"):
        assemble(src, INT8, tmp_path / "o", check_cancel=lambda: next(polls) >= 3)
    assert list(tmp_path.iterdir()) == []
    seen = []
    assemble(src, INT8, tmp_path / "o", progress=lambda done, total, name: seen.append((done, total)))
    assert seen[-1] == (20, 20) and len(seen) == 20
    with pytest.raises(SahcError, match="already exists"):
        assemble(src, INT8, tmp_path / "o")
    res = assemble(src, INT4, tmp_path / "o", overwrite=True)
    assert read_manifest(tmp_path / "o")["plan"]["name"] == "int4-g32" and res["n_tensors"] == 20


def test_shape_gate_reports_missing_wrong_and_extra(tiny_llama_dir):
    src = ModelSource.open(tiny_llama_dir)
    state = {t.name: torch.zeros(t.shape) for t in src.tensors()}
    del state["model.norm.weight"]
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(2)
    matched, total, mism = shape_gate(src, state)
    assert (matched, total) == (18, 20)
    assert {m["name"]: m["got"] for m in mism} == {"model.layers.0.mlp.up_proj.weight": [3, 3],
                                                   "model.norm.weight": None, "extra.weight": [2]}


def test_bounded_assembly_reads_big_tensors_in_their_stored_dtype_and_writes_the_same_checkpoint(
        tiny_llama_dir, tmp_path, monkeypatch):
    """Above io.rows.BOUNDED_MIN_BYTES every tensor goes to its method as stored (blocks, no float32 copy)."""
    from sahc_core.io import rows
    from sahc_core.plans import assemble as asm

    src = ModelSource.open(tiny_llama_dir)
    whole = load_assembled(assemble(src, INT4, tmp_path / "a", device="cpu")["out_dir"])
    monkeypatch.setattr(rows, "BOUNDED_MIN_BYTES", 0)
    seen = []
    real = asm.read_stored
    monkeypatch.setattr(asm, "read_stored", lambda s, n: seen.append(n) or real(s, n))
    _check_round_trip(src, INT4, tmp_path / "b")
    assert set(seen) == {t.name for t in src.tensors()}
    blocked = load_assembled(tmp_path / "b")
    assert all(torch.equal(blocked[k], whole[k]) for k in whole)
