"""Hardening (issue 13), a model directory is a trust boundary: index entries, header lengths, no pickle
fallback, non-float dtypes named and never analysed.

CLI cases go through ``sahc_core.cli.main.main`` and must print exactly one ``error:`` line (never
"unexpected"); identifiers and paths are in ``test_hardening_paths.py``, bounds and checks before work in
``test_hardening_limits.py``, the pages' cases in ``test_hardening_ui.py``.
"""
from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from _hardening_helpers import FFN, INT8, cli_error, plan_file

from sahc_core.cli.main import main
from sahc_core.errors import ModelError


# -- (2) model directories ------------------------------------------------------------------------------
def _index(d: Path) -> Path:
    return d / "model.safetensors.index.json"


@pytest.mark.parametrize("target", ["outside", "absolute", "dotdot-in-subdir", "not-safetensors"])
def test_index_entries_pointing_outside_are_refused_before_opening(target, tiny_llama_dir, tmp_path, capsys,
                                                                   monkeypatch):
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"SECRET!!" + b"x" * 100)
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    idx = json.loads(_index(d).read_text())
    name = sorted(idx["weight_map"])[0]
    idx["weight_map"][name] = {"outside": "../secret.safetensors", "absolute": str(secret),
                               "dotdot-in-subdir": "sub/../../secret.safetensors",
                               "not-safetensors": "config.json"}[target]
    _index(d).write_text(json.dumps(idx))
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self.resolve()) or real_open(self, *a, **k))
    line = cli_error(capsys, "inspect", "--model", str(d))
    assert "index" in line and ("outside the model directory" in line or "not a .safetensors" in line)
    assert secret.resolve() not in opened
    assert "SECRET" not in line and str(struct.unpack("<Q", b"SECRET!!")[0]) not in line


def test_header_length_is_checked_against_a_cap_before_reading(tmp_path, capsys):
    """A sparse file claiming a 3 GiB header: refused at once, nothing of that size is read."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with (d / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", 3 * 2**30) + b"{")
        fh.truncate(3 * 2**30 + 64)  # sparse: no disk used
    t0 = time.perf_counter()
    line = cli_error(capsys, "inspect", "--model", str(d))
    assert "header length" in line and "limit" in line and time.perf_counter() - t0 < 5
    assert str(3 * 2**30) not in line


@pytest.mark.parametrize("claim,expect", [(b"root:x:0", "limit"), (struct.pack("<Q", 5000), "truncated or corrupt")],
                         ids=["passwd-like bytes", "longer than the file"])
def test_a_bad_header_length_is_reported_without_echoing_it(claim, expect, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(claim + b":0:root:/root:/bin/bash\n")
    line = cli_error(capsys, "inspect", "--model", str(d))
    assert expect in line and str(struct.unpack("<Q", claim)[0]) not in line


def test_no_pickle_fallback_when_the_safetensors_are_missing(tiny_llama_tok_dir, tmp_path, monkeypatch, capsys):
    """`ppl` and `load_model` refuse a directory whose only weights are pytorch_model.bin; torch.load is never called."""
    from sahc_core.evaluate.model import load_model

    d = tmp_path / "m"
    shutil.copytree(tiny_llama_tok_dir, d)
    for p in [*d.glob("*.safetensors"), _index(d)]:
        p.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 a pickle that must never be loaded")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(ModelError):
        load_model(d, device="cpu")
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be " * 20)
    assert "pickle" in cli_error(capsys, "ppl", "--model", str(d), "--corpus", str(corpus), "--device", "cpu")


def test_load_model_asks_transformers_for_safetensors_only(tiny_llama_tok_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from sahc_core.evaluate.model import load_model

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_model(tiny_llama_tok_dir, device="cpu")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


_NON_FLOAT = {"I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2, "I64": torch.int64}


@pytest.fixture(scope="module")
def non_float_models(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny llama whose FFN down_proj is stored in each non-float dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = {}
    shard = json.loads(_index(tiny_llama_dir).read_text())["weight_map"][FFN]
    for name, dtype in _NON_FLOAT.items():
        d = tmp_path_factory.mktemp(f"nf-{name}") / "m"
        shutil.copytree(tiny_llama_dir, d)
        with safe_open(str(d / shard), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        w = tensors[FFN]
        tensors[FFN] = (w > 0) if dtype is torch.bool else (w * 100).to(dtype)
        save_file(tensors, str(d / shard), metadata={"format": "pt"})
        out[name] = d
    return out


@pytest.mark.parametrize("dtype", list(_NON_FLOAT))
def test_non_float_weights_are_named_and_never_analysed(dtype, non_float_models, tmp_path, cache_path, capsys):
    from sahc_core.io.source import ModelSource
    from sahc_core.spectra._blocked import spectrum_blocked
    from sahc_core.spectra.scan import matrix_table

    d = non_float_models[dtype]
    assert main(["inspect", "--model", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    row = next(t for t in info["tensors"] if t["name"] == FFN)
    assert row["dtype"] == dtype and row["analysed"] is False and dtype in info["non_float_note"]
    line = cli_error(capsys, "spectrum", "--model", str(d), "--tensor", FFN, "--device", "cpu", "--no-cache")
    assert f"stored as {dtype}" in line and "not as a 16/32/64-bit float" in line
    with pytest.raises(ModelError, match=f"stored as {dtype}"):  # the bounded-memory path reads slices itself
        spectrum_blocked(ModelSource.open(d), FFN)
    line = cli_error(capsys, "plan", "--model", str(d), "--plan", plan_file(tmp_path, INT8))
    assert f"stored as {dtype}" in line
    assert FFN not in set(matrix_table(ModelSource.open(d))["name"])  # a scan skips it instead of failing
    with pytest.raises(ModelError, match=dtype):
        ModelSource.open(d).read(FFN, dtype=torch.float32)


def test_every_safetensors_dtype_is_in_the_table():
    from safetensors.torch import _TYPES  # name -> torch dtype, the format's own list

    from sahc_core.io.dtypes import DTYPES

    assert set(_TYPES) <= set(DTYPES), set(_TYPES) - set(DTYPES)
    for name, dt in _TYPES.items():
        if dt.itemsize:
            assert DTYPES[name].bits == 8 * dt.itemsize or name.startswith(("F4", "F6")), name
    assert {n for n, d in DTYPES.items() if d.analysed} == {"F16", "BF16", "F32", "F64"}
