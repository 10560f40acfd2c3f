"""Tests for sahc_core.io.source: lazy sharded safetensors access, fingerprint, clear errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sahc_core.errors import ModelError
from sahc_core.io.source import ModelSource, TensorInfo

INDEX = "model.safetensors.index.json"


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


@pytest.fixture(scope="module")
def llama_reference(tiny_llama_dir):
    """State dict as transformers loads it (independent of model_io)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_open_lists_every_stored_tensor_from_headers(tiny_llama_dir, llama_reference):
    src = ModelSource.open(tiny_llama_dir)
    assert src.path == Path(tiny_llama_dir).resolve()
    assert src.architecture == "llama"
    assert src.config["hidden_size"] == 64
    index = json.loads((tiny_llama_dir / INDEX).read_text())["weight_map"]
    names = [t.name for t in src.tensors()]
    assert names == sorted(index)  # sorted, exactly the index
    assert len({t.file for t in src.tensors()}) == 2  # really sharded
    # the tied LM head is not stored; every other tensor transformers has is listed with its shape
    assert set(llama_reference) - set(names) == {"lm_head.weight"}
    for t in src.tensors():
        assert t.shape == tuple(llama_reference[t.name].shape)
        assert t.dtype == "F32"
        assert t.file == index[t.name]
        assert t.numel == llama_reference[t.name].numel()
    assert src.num_params == sum(v.numel() for k, v in llama_reference.items() if k != "lm_head.weight")
    assert src.tied_embeddings is True


def test_read_one_tensor_equals_transformers_value(tiny_llama_dir, llama_reference):
    src = ModelSource.open(tiny_llama_dir)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        got = src.read(name)
        assert got.device.type == "cpu" and got.dtype == torch.float32
        assert torch.equal(got, llama_reference[name])
    bf = src.read("model.layers.0.self_attn.q_proj.weight", device="auto", dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    assert torch.equal(bf, llama_reference["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))


def test_info_and_read_unknown_tensor(tiny_llama_dir):
    src = ModelSource.open(tiny_llama_dir)
    assert src.info("model.norm.weight") == TensorInfo("model.norm.weight", (64,), "F32", src.info("model.norm.weight").file)
    for call in (src.info, src.read):
        with pytest.raises(ModelError, match="no tensor named 'nope.weight'"):
            call("nope.weight")


def test_qwen35_fixture_has_mtp_shard_and_text_config_tie(tiny_qwen35_dir):
    src = ModelSource.open(tiny_qwen35_dir)
    assert src.architecture == "qwen3_5"
    mtp = [t for t in src.tensors() if t.name.startswith("mtp.")]
    assert mtp and {t.file for t in mtp} == {"model-mtp.safetensors"}
    assert src.read("mtp.fc.weight").shape == (64, 128)
    assert src.tied_embeddings is True


def test_single_file_without_index(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "tie_word_embeddings": False}))
    w = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    save_file({"b": w, "a": torch.zeros(4, dtype=torch.bfloat16)}, str(model / "model.safetensors"))
    src = ModelSource.open(model)
    assert [(t.name, t.shape, t.dtype) for t in src.tensors()] == [("a", (4,), "BF16"), ("b", (2, 3), "F16")]
    assert torch.equal(src.read("b"), w)
    assert src.tied_embeddings is False
    assert src.num_params == 10


def test_unknown_architecture_when_model_type_missing(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": torch.ones(2, 2)}, str(model / "model.safetensors"))
    assert ModelSource.open(model).architecture == "unknown"


# ----------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_across_reopen_and_copy(tiny_llama_dir, tmp_path):
    fp = ModelSource.open(tiny_llama_dir).fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert ModelSource.open(tiny_llama_dir).fingerprint == fp
    assert ModelSource.open(_copy(tiny_llama_dir, tmp_path)).fingerprint == fp  # content, not path


def test_fingerprint_changes_with_values_and_headers(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    fp0 = ModelSource.open(model).fingerprint
    shard = _first_shard(model)
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0  # same header and size, different values
    save_file(tensors, str(shard), metadata={"format": "pt"})
    fp1 = ModelSource.open(model).fingerprint
    assert fp1 != fp0
    tensors[name] = tensors[name].to(torch.float16)  # different header and size
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert ModelSource.open(model).fingerprint not in (fp0, fp1)


def _write_sparse_shard(path: Path, tensors: dict[str, tuple[int, ...]]) -> int:
    """Write a BF16 safetensors header and extend the file sparsely to its full data size.

    Hand-written header because safetensors can only serialize tensors that exist in memory;
    here the point is a multi-GB checkpoint whose data is never allocated.
    """
    header, offset = {}, 0
    for name, shape in tensors.items():
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
    os.truncate(path, 8 + len(raw) + offset)
    return offset


def test_open_19gb_checkpoint_reads_headers_only(tmp_path):
    """A Qwen3.5-9B-sized (about 19 GB BF16) sparse checkpoint opens in well under a second."""
    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    h, inter, vocab = 4096, 12288, 248320
    shards: list[dict[str, tuple[int, ...]]] = [{"model.language_model.embed_tokens.weight": (vocab, h)}, {}, {}, {}]
    for layer in range(32):
        p = f"model.language_model.layers.{layer}."
        part = shards[1 + layer % 3]
        part[p + "mlp.gate_proj.weight"] = (inter, h)
        part[p + "mlp.up_proj.weight"] = (inter, h)
        part[p + "mlp.down_proj.weight"] = (h, inter)
        part[p + "linear_attn.in_proj_qkv.weight"] = (8192, h)
        part[p + "linear_attn.in_proj_z.weight"] = (h, h)
        part[p + "linear_attn.out_proj.weight"] = (h, h)
        part[p + "input_layernorm.weight"] = (h,)
    shards[0]["lm_head.weight"] = (vocab, h)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00004.safetensors"
        total += _write_sparse_shard(model / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    (model / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    assert total > 18e9
    assert sum(f.stat().st_blocks for f in model.iterdir()) * 512 < 50e6  # really sparse: no data on disk

    start = time.perf_counter()
    src = ModelSource.open(model)
    fp = src.fingerprint
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"open took {elapsed:.2f} s; it must read headers only"
    assert src.num_params * 2 == total
    assert len(src.tensors()) == len(weight_map) and len(fp) == 64


# ----------------------------------------------------------------------------------- errors


def _assert_one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_error_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist") as exc:
        ModelSource.open(tmp_path / "absent")
    _assert_one_sentence(exc)


def test_error_path_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file, not a directory") as exc:
        ModelSource.open(f)
    _assert_one_sentence(exc)


def test_error_no_config(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    (model / "config.json").unlink()
    with pytest.raises(ModelError, match="no config.json") as exc:
        ModelSource.open(model)
    _assert_one_sentence(exc)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_error_config_not_valid_json(tiny_llama_dir, tmp_path, text):
    model = _copy(tiny_llama_dir, tmp_path)
    (model / "config.json").write_text(text)
    with pytest.raises(ModelError, match="config file .*(not valid JSON|JSON object)") as exc:
        ModelSource.open(model)
    _assert_one_sentence(exc)


def test_error_no_safetensors(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no \*\.safetensors files") as exc:
        ModelSource.open(model)
    _assert_one_sentence(exc)


def test_error_pickle_only_is_refused_not_unpickled(tmp_path, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")

    def _forbidden(*args, **kwargs):
        raise AssertionError("a pickle checkpoint must never be loaded")

    monkeypatch.setattr(torch, "load", _forbidden)
    with pytest.raises(ModelError, match="pickle") as exc:
        ModelSource.open(model)
    msg = _assert_one_sentence(exc)
    assert "pytorch_model.bin" in msg and "safe_serialization=True" in msg


@pytest.mark.parametrize("keep", [4, 100, -16])
def test_error_truncated_shard(tiny_llama_dir, tmp_path, keep):
    """Cut inside the length prefix, inside the header, and inside the tensor data."""
    model = _copy(tiny_llama_dir, tmp_path)
    shard = _first_shard(model)
    data = shard.read_bytes()
    shard.write_bytes(data[:keep])
    with pytest.raises(ModelError, match="truncated") as exc:
        ModelSource.open(model)
    assert shard.name in _assert_one_sentence(exc)


def test_error_corrupt_header(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    shard = _first_shard(model)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"#garbage####"  # header length unchanged, JSON broken
    shard.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt safetensors header") as exc:
        ModelSource.open(model)
    assert shard.name in _assert_one_sentence(exc)


def test_error_header_offsets_beyond_file(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _write_sparse_shard(model / "model.safetensors", {"w": (8, 8)})
    with (model / "model.safetensors").open("r+b") as fh:  # drop the last 10 data bytes
        fh.truncate((model / "model.safetensors").stat().st_size - 10)
    with pytest.raises(ModelError, match="truncated"):
        ModelSource.open(model)


def test_error_shard_named_in_index_missing(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    shard = _first_shard(model)
    shard.unlink()
    with pytest.raises(ModelError, match=f"shard {shard.name} named in {INDEX} is missing") as exc:
        ModelSource.open(model)
    _assert_one_sentence(exc)


def test_error_index_maps_tensor_to_wrong_shard(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    index = json.loads((model / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    (model / INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelError, match=f"maps tensor {name} to {files[1]}"):
        ModelSource.open(model)


def test_error_index_not_json(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    (model / INDEX).write_text("{")
    with pytest.raises(ModelError, match="index file .* is not valid JSON"):
        ModelSource.open(model)


def test_error_tensor_stored_twice(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(model / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(model / "b.safetensors"))
    with pytest.raises(ModelError, match="tensor w is stored twice") as exc:
        ModelSource.open(model)
    _assert_one_sentence(exc)



def test_error_unreadable_shard(tiny_llama_dir, monkeypatch):
    """An OS error (e.g. permission denied; chmod is ignored when tests run as root) is one line."""
    import sahc_core.io.source as mio

    def _denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(mio, "_read_header", _denied)
    with pytest.raises(ModelError, match=r"cannot read model-00001-of-00002.safetensors \(Permission denied\)") as exc:
        ModelSource.open(tiny_llama_dir)
    _assert_one_sentence(exc)
