"""The per-session Workspace: byte-bounded caches, and two sessions measuring at once never see each
other's Ŵ (no module-global state, no weights swapped in place on a shared model)."""
from __future__ import annotations

import threading

import pytest
import torch

from sahc_core.io.source import ModelSource
from sahc_core.methods.quant import QuantConfig
from sahc_core.methods.registry import measure
from sahc_core.workspace import ByteLRU, Workspace, nbytes_of
from sahc_core.whatif.measure import measure_tensor, output_cosine_for

Q = "model.layers.0.self_attn.q_proj.weight"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


def test_byte_lru_evicts_by_bytes_not_entries():
    lru = ByteLRU(budget_bytes=3 * 4000)
    for i in range(5):
        lru.put(i, torch.zeros(1000))  # 4000 bytes each
    assert len(lru) == 3 and lru.used == 12000 and lru.get(0) is None and lru.get(4) is not None
    lru.put("huge", torch.zeros(10_000))  # larger than the whole budget: not kept
    assert lru.get("huge") is None and lru.used <= lru.budget
    assert nbytes_of({"a": (torch.zeros(2, 3), [torch.zeros(4, dtype=torch.float64)])}) == 24 + 32


def test_workspace_caches_stay_within_their_budget(tiny_llama_dir):
    src = ModelSource.open(tiny_llama_dir)
    ws = Workspace(budget_bytes=200_000)
    for t in src.tensors():
        if len(t.shape) == 2:
            measure_tensor(src, t.name, QuantConfig(4, 32), workspace=ws)
    assert 0 < ws.used_bytes <= ws.budget_bytes


class ByteTokenizer:
    """A real byte-level tokenizer (vocab 256 = the tiny llama's vocab): one id per UTF-8 byte."""

    def __call__(self, text: str, **_: object) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}


def _race(fn, args_list):
    barrier = threading.Barrier(len(args_list))
    out, errors = [None] * len(args_list), []

    def run(i, args):
        try:
            barrier.wait()
            for _ in range(3):
                out[i] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


def test_two_threads_measuring_different_settings_get_their_own_numbers(tiny_llama_dir):
    src, ws = ModelSource.open(tiny_llama_dir), Workspace()
    cfgs = [QuantConfig(2, 16), QuantConfig(8, None)]
    got = _race(lambda c: measure_tensor(src, Q, c, workspace=ws), [(c,) for c in cfgs])
    W = src.read(Q, dtype=torch.float32)
    for m, c in zip(got, cfgs):
        assert m["rel_error"] == pytest.approx(measure(W, c)["rel_error"], rel=1e-6)
    assert got[0]["rel_error"] > 10 * got[1]["rel_error"]


def test_two_threads_output_cosine_on_one_shared_model(tiny_llama_dir):
    """Each thread's block output cosine equals the one computed alone (the model is never modified)."""
    from transformers import AutoModelForCausalLM

    src, ws = ModelSource.open(tiny_llama_dir), Workspace()
    net = (AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), ByteTokenizer())
    before = {k: v.clone() for k, v in net[0].state_dict().items()}
    cfgs = [QuantConfig(2, 16), QuantConfig(8, None)]
    alone = [output_cosine_for(src, Q, c, model=net, calib_text=TEXT, n_tokens=64, workspace=Workspace())
             for c in cfgs]
    got = _race(lambda c: output_cosine_for(src, Q, c, model=net, calib_text=TEXT, n_tokens=64, workspace=ws),
                [(c,) for c in cfgs])
    for a, g in zip(alone, got):
        assert g["block_output_cosine"] == pytest.approx(a["block_output_cosine"], rel=1e-9)
        assert g["output_cosine"] == pytest.approx(a["output_cosine"], rel=1e-9)
    assert all(torch.equal(before[k], v) for k, v in net[0].state_dict().items())


def test_library_calls_never_change_the_thread_count(tiny_llama_dir, monkeypatch):
    """torch's thread count is process-wide: only an entry point that owns the process (the CLI, with
    adaptive_threads=True) may change it; a library call from a page thread never does."""
    from sahc_core.spectra.spectrum import tensor_spectrum

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    # a thread count no adaptive choice keeps (it picks 1 or the core count), whatever OMP_NUM_THREADS says
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    src = ModelSource.open(tiny_llama_dir)
    measure_tensor(src, Q, QuantConfig(4, 32))
    tensor_spectrum(src, Q)
    assert calls == []
    tensor_spectrum(src, "model.layers.0.mlp.gate_proj.weight", adaptive_threads=True)
    assert calls  # the opt-in path does tune them (serial eigensolver for a small Gram), and restores
