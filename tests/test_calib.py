"""Calibration statistics: XᵀX against stored activations, the held-out split, storage, the output error."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import sahc_core.calib.store as store
from sahc_core.cache import Cache
from sahc_core.calib.stats import CalibConfig, pack_symmetric, unpack_symmetric
from sahc_core.calib.store import KIND, calibration_stats, stats_dir
from sahc_core.errors import CorpusError
from sahc_core.evaluate.activations import capture_inputs
from sahc_core.evaluate.model import load_model
from sahc_core.io.source import ModelSource
from sahc_core.metrics import output_error
from tiny_models import TINY_TEXT, build_tiny_qwen35, with_word_tokenizer

TEXT = TINY_TEXT * 3  # 702 word tokens
CFG = CalibConfig(tokens=256, heldout_tokens=128, extras=("abs_mean", "abs_max"))  # windows of 128 (max positions)


@pytest.fixture(scope="module")
def net(tiny_llama_tok_dir: Path):
    return load_model(tiny_llama_tok_dir, device="cpu")


@pytest.fixture(scope="module")
def stats(tiny_llama_tok_dir: Path, net, tmp_path_factory: pytest.TempPathFactory):
    cache = Cache(tmp_path_factory.mktemp("calib") / "sahc.duckdb")
    model, tok = net
    return calibration_stats(ModelSource.open(tiny_llama_tok_dir), cache, TEXT, CFG, model=model, tokenizer=tok)


def _ids(tok) -> torch.Tensor:
    return torch.tensor(tok(TEXT)["input_ids"])


def _heldout_inputs(net, module: str) -> torch.Tensor:
    """Activations entering ``module`` on the held-out tokens (plain forward passes, one 128-token window)."""
    model, tok = net
    ids = _ids(tok)[CFG.tokens : CFG.tokens + CFG.heldout_tokens]
    got: list[torch.Tensor] = []
    h = model.get_submodule(module).register_forward_pre_hook(lambda _m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids.unsqueeze(0))
    h.remove()
    return torch.cat(got).double()


def _perturbed(W: torch.Tensor, scale: float = 0.3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return W + scale * W.std() * torch.randn(W.shape, generator=g)


def _direct_output_error(X: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor) -> float:
    X, W, W_hat = X.double(), W.double(), W_hat.double()
    return float((X @ (W - W_hat).T).norm() / (X @ W.T).norm())


LAYERS = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.up_proj",
          "model.layers.1.mlp.down_proj", "lm_head"]


@pytest.mark.parametrize("module", LAYERS)
def test_xtx_equals_stored_activations(stats, net, module: str) -> None:
    model, tok = net
    X = capture_inputs(model, tok, TEXT, module, n_tokens=CFG.tokens).double()
    s = stats.for_weight(f"{module}.weight")
    assert s.n_tokens == X.shape[0] == CFG.tokens and s.split == "fit" and s.xtx.dtype == torch.float64
    torch.testing.assert_close(s.xtx, X.T @ X, rtol=1e-5, atol=1e-5 * float((X.T @ X).abs().max()))
    torch.testing.assert_close(s.extras["abs_mean"], X.abs().mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.extras["abs_max"], X.abs().amax(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("module", LAYERS)
def test_heldout_uses_the_tokens_after_the_fitting_ones(stats, net, module: str) -> None:
    X = _heldout_inputs(net, module)
    held = stats.heldout_for_weight(f"{module}.weight")
    assert held.key != stats.for_weight(f"{module}.weight").key and held.key.startswith(stats.key)
    assert held.split == "heldout" and held.n_tokens == X.shape[0] == CFG.heldout_tokens
    torch.testing.assert_close(held.xtx, X.T @ X, rtol=1e-5, atol=1e-5 * float((X.T @ X).abs().max()))
    fit = stats.for_weight(f"{module}.weight").xtx * (CFG.heldout_tokens / CFG.tokens)
    assert (held.xtx - fit).norm() > 1e-3 * fit.norm()  # other tokens, other statistics


def test_shared_inputs_are_stored_once(stats) -> None:
    p = "model.layers.0."
    assert {stats.input_of(p + f"self_attn.{k}_proj.weight") for k in "qkv"} == {p + "self_attn.q_proj"}
    assert {stats.input_of(p + f"mlp.{k}_proj.weight") for k in ("gate", "up")} == {p + "mlp.gate_proj"}
    assert len({stats.input_of(w) for w in stats.weights()}) == 2 * 4 + 1  # 4 inputs per layer + the LM head
    k, v = stats.for_weight(p + "self_attn.k_proj.weight"), stats.for_weight(p + "self_attn.v_proj.weight")
    assert torch.equal(k.xtx, v.xtx) and k.xtx.data_ptr() != v.xtx.data_ptr()  # one stored copy, fresh reads
    assert stats.for_weight(p + "input_layernorm.weight") is None and stats.for_weight("nope") is None
    # tied LM head: the embedding's stored name answers with the LM head's input
    assert stats.input_of("model.embed_tokens.weight") == "lm_head"


@pytest.mark.parametrize("module", LAYERS)
def test_output_error_from_xtx_equals_the_activation_form(stats, net, module: str) -> None:
    model, tok = net
    W = model.get_submodule(module).weight.detach()
    W_hat = _perturbed(W)
    X_fit = capture_inputs(model, tok, TEXT, module, n_tokens=CFG.tokens)
    X_held = _heldout_inputs(net, module)
    for s, X in ((stats.for_weight(f"{module}.weight"), X_fit), (stats.heldout.for_weight(f"{module}.weight"), X_held)):
        got = output_error(W, W_hat, s.xtx)
        assert got == pytest.approx(_direct_output_error(X, W, W_hat), rel=1e-5)
        assert 0.01 < got < 2
    if module == "lm_head":  # tied: the same parameter as the embedding
        assert W.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_embedding_output_error_from_token_counts(stats, net) -> None:
    model, tok = net
    W = model.get_input_embeddings().weight.detach()
    W_hat = _perturbed(W, seed=1)
    W_hat[5:] = W[5:]  # only some rows differ: the weighting by counts matters
    ids = _ids(tok)
    for view, part in ((stats, ids[: CFG.tokens]), (stats.heldout, ids[CFG.tokens : CFG.tokens + CFG.heldout_tokens])):
        counts = view.token_counts
        assert int(counts.sum()) == part.numel() and counts.shape == (W.shape[0],)
        direct = float((W[part] - W_hat[part]).double().norm() / W[part].double().norm())
        assert output_error(W, W_hat, counts) == pytest.approx(direct, rel=1e-6)  # 1-D counts: the lookup form


@pytest.mark.parametrize("n", [1, 2, 7])
def test_symmetric_packing_round_trip(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = A @ A.T
    packed = pack_symmetric(H)
    assert packed.shape == (n * (n + 1) // 2,)
    assert torch.equal(packed[:n], H[0])  # the first row comes first, whole
    assert torch.equal(unpack_symmetric(packed, n), H.triu() + H.triu(1).T)
    assert unpack_symmetric(packed.float(), n).dtype == torch.float64


def test_stored_size_is_the_packed_float32_triangle(stats) -> None:
    from safetensors import safe_open

    with safe_open(str(stats.path / "model.layers.1.safetensors"), framework="pt") as fh:
        shapes = {k: (fh.get_slice(k).get_shape(), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    assert shapes["fit/model.layers.1.mlp.down_proj"] == ([128 * 129 // 2], "F32")
    assert shapes["heldout/model.layers.1.self_attn.q_proj"] == ([64 * 65 // 2], "F32")
    assert shapes["fit/model.layers.1.mlp.gate_proj/abs_max"] == ([64], "F32")


def test_second_call_is_a_lookup(stats, tiny_llama_tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(stats.path.parents[2] / "sahc.duckdb")
    source = ModelSource.open(tiny_llama_tok_dir)
    monkeypatch.setattr(store, "capture_stats", lambda *a, **k: pytest.fail("recomputed"))
    again = calibration_stats(source, cache, TEXT, CFG)  # no model given: none is loaded either
    assert again.path == stats.path and again.meta == stats.meta
    row = cache.get(KIND, source.fingerprint, CFG.key(stats.meta["text_sha256"]), 1)
    assert row["dir"] == str(stats.path.relative_to(cache.path.parent))
    assert stats.path == stats_dir(cache, source.fingerprint, stats.meta["key"])
    assert stats.meta["tokens"] == CFG.tokens and stats.meta["windows"] == {"fit": 2, "heldout": 1}


def test_changed_model_and_broken_folders_are_recaptured(stats, net, tiny_llama_tok_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path / "sahc.duckdb")
    src = ModelSource.open(tiny_llama_tok_dir)
    small = CalibConfig(tokens=128, heldout_tokens=0)
    calls = []
    real = store.capture_stats
    monkeypatch.setattr(store, "capture_stats", lambda *a, **k: (calls.append(1), real(*a, **k)))
    model, tok = net
    first = calibration_stats(src, cache, TEXT, small, model=model, tokenizer=tok)
    assert first.heldout is None and first.heldout_for_weight("lm_head.weight") is None and len(calls) == 1
    other = ModelSource(src.path, src.config, src.tensors(), "f" * 64)  # the model file changed
    moved = calibration_stats(other, cache, TEXT, small, model=model, tokenizer=tok)
    assert len(calls) == 2 and moved.path != first.path and moved.meta["model_fp"] == "f" * 64
    shard = first.path / "model.layers.1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated behind a valid row
    again = calibration_stats(src, cache, TEXT, small, model=model, tokenizer=tok)
    assert len(calls) == 3 and again.path == first.path and again.meta["created_at"] > first.meta["created_at"]
    torch.testing.assert_close(again.for_weight("lm_head.weight").xtx, first.for_weight("lm_head.weight").xtx)
    shutil.rmtree(first.path)  # folder gone
    calibration_stats(src, cache, TEXT, small, model=model, tokenizer=tok)
    assert len(calls) == 4 and json.loads((first.path / "index.json").read_text())["format"] == 1
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".tmp-")]  # temporaries cleaned up


def test_too_short_text_and_bad_config_are_refused(net, tiny_llama_tok_dir: Path, tmp_path: Path) -> None:
    model, tok = net
    src, cache = ModelSource.open(tiny_llama_tok_dir), Cache(tmp_path / "sahc.duckdb")
    n = _ids(tok).numel()
    with pytest.raises(CorpusError, match=f"{n} tokens but {n - 99} fitting \\+ 100 held-out"):
        calibration_stats(src, cache, TEXT, CalibConfig(tokens=n - 99, heldout_tokens=100), model=model, tokenizer=tok)
    assert not list(tmp_path.glob("calib/*/*"))  # nothing half-written is left
    with pytest.raises(ValueError, match="runs in torch.float32 but the config asks for bfloat16"):
        calibration_stats(src, cache, TEXT, CalibConfig(tokens=64, dtype="bfloat16"), model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="give both model and tokenizer"):
        calibration_stats(src, cache, TEXT, CalibConfig(tokens=64), model=model)
    for bad in (dict(tokens=0), dict(heldout_tokens=-1), dict(store_dtype="float16"), dict(extras=("mean",))):
        with pytest.raises(ValueError):
            CalibConfig(**bad)
    keys = {CalibConfig(**kw).key("abc") for kw in ({}, {"tokens": 8}, {"window": 64}, {"store_dtype": "float64"})}
    assert len(keys) == 4


def test_hybrid_model_maps_checkpoint_names(tmp_path: Path) -> None:
    """Qwen3.5: the checkpoint says model.language_model.layers.N, the loaded CausalLM model.layers.N."""
    d = with_word_tokenizer(build_tiny_qwen35(tmp_path / "raw"), tmp_path / "m")
    source = ModelSource.open(d)
    st = calibration_stats(source, Cache(tmp_path / "sahc.duckdb"), TINY_TEXT, CalibConfig(tokens=64, heldout_tokens=0),
                           device="cpu")
    model, tok = load_model(d, device="cpu")
    stored = {t.name for t in source.tensors()}
    lin = "model.language_model.layers.0.linear_attn."
    assert lin + "in_proj_qkv.weight" in stored
    assert {st.input_of(lin + f"in_proj_{k}.weight") for k in ("qkv", "z", "a", "b")} == {
        "model.layers.0.linear_attn.in_proj_qkv"}
    X = capture_inputs(model, tok, TINY_TEXT, "model.layers.0.linear_attn.out_proj", n_tokens=64).double()
    torch.testing.assert_close(st.for_weight(lin + "out_proj.weight").xtx, X.T @ X, rtol=1e-5, atol=1e-6)
    assert st.for_weight("model.language_model.layers.1.self_attn.k_proj.weight").xtx.shape == (64, 64)
    assert st.for_weight("mtp.layers.0.self_attn.q_proj.weight") is None  # never run on text
    assert math.isclose(float(st.token_counts.sum()), 64)


def test_gemma3_checkpoint_names_are_found(tiny_gemma3_dir: Path, tmp_path: Path) -> None:
    """Gemma 3's hub files say language_model.model.X, its class model.language_model.X: not an insertion,
    the family's explicit name map finds them; vision tensors have no statistics (never run on text)."""
    d = with_word_tokenizer(tiny_gemma3_dir, tmp_path / "m")
    source = ModelSource.open(d)
    st = calibration_stats(source, Cache(tmp_path / "sahc.duckdb"), TINY_TEXT, CalibConfig(tokens=64, heldout_tokens=0),
                           device="cpu")
    model, tok = load_model(d, device="cpu")
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    X = capture_inputs(model, tok, TINY_TEXT, "model.language_model.layers.1.mlp.down_proj", n_tokens=64).double()
    torch.testing.assert_close(st.for_weight(name).xtx, X.T @ X, rtol=1e-5, atol=1e-6)
    assert st.for_weight("vision_tower.encoder.layers.0.mlp.fc1.weight") is None


def test_cli_calib(tiny_llama_tok_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sahc_core.cli.main import main

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    argv = ["calib", "--model", str(tiny_llama_tok_dir), "--tokens", "128", "--heldout-tokens", "64", "--corpus",
            str(corpus), "--cache", str(tmp_path / "sahc.duckdb"), "--device", "cpu", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == 128 and out["heldout_tokens"] == 64 and out["cached"] is False
    assert Path(out["dir"]).is_dir() and out["bytes"] == sum(f.stat().st_size for f in Path(out["dir"]).iterdir()
                                                             if f.suffix == ".safetensors")
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cached"] is True


def test_cli_measure_calib_tokens_use_the_statistics_calib_captured(tiny_llama_tok_dir: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture, monkeypatch) -> None:
    """``measure --calib --calib-tokens N --calib-heldout-tokens M`` finds what ``calib --tokens N --heldout-tokens M``
    captured (no second capture); other counts are other statistics (a capture)."""
    from sahc_core.calib import store
    from sahc_core.cli.main import main

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    common = ["--model", str(tiny_llama_tok_dir), "--corpus", str(corpus), "--cache", str(tmp_path / "sahc.duckdb"),
              "--device", "cpu", "--json"]
    assert main(["calib", "--tokens", "128", "--heldout-tokens", "64", *common]) == 0
    capsys.readouterr()

    def no_capture(*a, **k):
        raise AssertionError("captured again")

    monkeypatch.setattr(store, "_capture", no_capture)
    measure = ["measure", "--tensor", "model.layers.0.mlp.down_proj.weight", "--method", "gptq", "--calib", *common]
    assert main([*measure, "--calib-tokens", "128", "--calib-heldout-tokens", "64"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == "gptq" and out["output_error"] > 0
    assert main([*measure, "--calib-tokens", "96", "--calib-heldout-tokens", "64"]) != 0  # other statistics
    assert "captured again" in capsys.readouterr().err
