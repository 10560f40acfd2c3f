"""Layer-sequential perplexity from the safetensors files: equal to the in-memory path, one layer held at a time."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from sahc_core.errors import ModelError
from sahc_core.evaluate.layerwise import STEM, decoder_layers
from sahc_core.evaluate.model import load_model, load_state, load_tokenizer
from sahc_core.evaluate.names import empty_model, name_map_for
from sahc_core.evaluate.offload import (HEADROOM_BYTES, LayerLoader, available_memory, decide_offload,
                                        perplexity_layerwise)
from sahc_core.evaluate.perplexity import PplConfig, perplexity
from sahc_core.evaluate.weights import AssembledWeights, CheckpointWeights
from sahc_core.io.source import ModelSource
from tiny_models import TINY_TEXT


def _layerwise(model_dir, cfg: PplConfig, weights=None, text: str = TINY_TEXT):
    source = ModelSource.open(model_dir)
    model = empty_model(model_dir, cfg.dtype)
    names = name_map_for(source, model)
    loader = LayerLoader(model, weights if weights is not None else CheckpointWeights(source), names)
    res = perplexity_layerwise(model, load_tokenizer(model_dir), text, cfg, prepare=loader)
    assert {p.device.type for p in model.parameters()} == {"meta"}  # every layer freed again
    return res, loader


def test_equal_to_in_memory_on_the_default_model() -> None:
    """The embedded default model (SmolLM2-135M), first 100 tokens in overlapping 48-token windows."""
    from sahc_core.io.corpus import default_corpus
    from sahc_core.io.default_model import default_model_dir

    path, text = default_model_dir(), default_corpus().test_text
    cfg = PplConfig(window=48, stride=32, max_tokens=100)
    model, tok = load_model(path, device="cpu")
    ref = perplexity(model, tok, text, cfg)
    del model
    got, loader = _layerwise(path, cfg, text=text)
    assert (got.tokens, got.windows, got.window, got.stride) == (ref.tokens, ref.windows, 48, 32) and got.windows == 3
    assert abs(got.ppl - ref.ppl) / ref.ppl < 1e-5
    assert loader.loads == 30 * 9 + 3 * 2  # 30 layers x 9 tensors; embedding + final norm for probe, stem, head


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hybrid_qwen35_original_and_assembled(tiny_tok_dirs, tmp_path, dtype) -> None:
    """Linear- and full-attention layers of a tiny Qwen3.5, from the original and from an assembled checkpoint."""
    from sahc_core.plans.assemble import assemble
    from sahc_core.plans.plan import CompressionPlan

    path = tiny_tok_dirs["qwen3_5"]
    cfg = PplConfig(window=32, dtype=dtype)
    model, tok = load_model(path, device="cpu", dtype=dtype)
    assert [type(m.linear_attn if hasattr(m, "linear_attn") else m.self_attn).__name__
            for _, m in decoder_layers(model)] == ["Qwen3_5GatedDeltaNet", "Qwen3_5Attention"]
    ref = perplexity(model, tok, TINY_TEXT, cfg)
    got, _ = _layerwise(path, cfg)
    assert abs(got.ppl - ref.ppl) / ref.ppl < 1e-5 and got.dtype == dtype
    out = tmp_path / "a"
    plan = CompressionPlan.from_json("plans/int4-g128.json")
    assemble(ModelSource.open(path), plan, out)
    weights = AssembledWeights(out, getattr(torch, dtype))
    load_state(model, weights)
    ref_c = perplexity(model, tok, TINY_TEXT, cfg)
    got_c, _ = _layerwise(path, cfg, weights)
    assert abs(got_c.ppl - ref_c.ppl) / ref_c.ppl < 1e-5 and got_c.ppl != got.ppl


def test_one_layer_in_memory_at_a_time(tiny_tok_dirs) -> None:
    path = tiny_tok_dirs["qwen3_5"]
    source = ModelSource.open(path)
    model = empty_model(path)
    seen: dict[int, set[str]] = {}

    class Spy(LayerLoader):
        @contextmanager
        def __call__(self, turn):
            with super().__call__(turn):
                seen.setdefault(turn.index, set()).update(
                    n for n, p in model.named_parameters() if p.device.type != "meta")
                yield

    layers = [n for n, _ in decoder_layers(model)]
    loader = Spy(model, CheckpointWeights(source), name_map_for(source, model))
    perplexity_layerwise(model, load_tokenizer(path), TINY_TEXT, PplConfig(window=32), prepare=loader)
    stem = {"model.embed_tokens.weight", "model.norm.weight"}  # the tied head is the embedding
    assert seen[STEM] == stem
    for i, name in enumerate(layers):
        assert seen[i] and all(n.startswith(name + ".") for n in seen[i])
    assert seen[len(layers)] == stem


def test_softcapped_logits_and_the_head_check(tmp_path) -> None:
    """Gemma's final logit soft-capping (``Gemma3ForCausalLM``) is reproduced; a model whose logits are
    anything else is refused (the VLM class ignores the setting: covered by the runs on tiny Gemma 3)."""
    import transformers as tf

    from tiny_models import tiny_gemma3_config, with_word_tokenizer

    torch.manual_seed(0)
    text = tiny_gemma3_config().text_config
    text.final_logit_softcapping = 2.0
    tf.Gemma3ForCausalLM(text).save_pretrained(tmp_path / "raw")
    path = with_word_tokenizer(tmp_path / "raw", tmp_path / "g")
    cfg = PplConfig(window=32)
    model, tok = load_model(path, device="cpu")
    ref = perplexity(model, tok, TINY_TEXT, cfg)
    got, _ = _layerwise(path, cfg)
    assert abs(got.ppl - ref.ppl) / ref.ppl < 1e-5
    text.final_logit_softcapping = None  # the same weights without capping: a different number
    assert abs(perplexity(tf.Gemma3ForCausalLM.from_pretrained(path, config=text).eval(), tok, TINY_TEXT,
                          cfg).ppl - ref.ppl) > 1e-3
    model.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out["logits"] * 2))
    with pytest.raises(ModelError, match="not its LM head applied"):
        perplexity_layerwise(model, tok, TINY_TEXT, cfg)


def test_offload_decision_rule() -> None:
    gib = 2**30
    fits = decide_offload("auto", weights_bytes=gib, logits_bytes=gib // 4, available=4 * gib)
    assert not fits.offload and fits.need_bytes == gib + gib // 2 + HEADROOM_BYTES and "within" in fits.reason
    tight = decide_offload("auto", weights_bytes=gib, logits_bytes=gib // 4, available=3 * gib)
    assert tight.offload and "more than" in tight.reason
    assert decide_offload("always", 1, 1, available=100 * gib).offload
    assert not decide_offload("never", 100 * gib, 1, available=gib).offload
    with pytest.raises(ValueError, match="offload must be one of"):
        decide_offload("sometimes", 1, 1, available=gib)
    total = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < available_memory() <= total


def test_calibration_capture_one_layer_at_a_time(tiny_tok_dirs, tmp_path) -> None:
    """Calibration statistics of a model larger than RAM: the offloaded capture stores the same XᵀX."""
    from sahc_core.cache import Cache
    from sahc_core.calib.stats import CalibConfig
    from sahc_core.calib.store import calibration_stats

    source = ModelSource.open(tiny_tok_dirs["qwen3_5"])
    cfg, text = CalibConfig(tokens=96, heldout_tokens=32, window=32), TINY_TEXT * 3
    mem = calibration_stats(source, Cache(tmp_path / "a.duckdb"), text, cfg, device="cpu")
    off = calibration_stats(source, Cache(tmp_path / "b.duckdb"), text, cfg, device="cpu", offload=True)
    assert sorted(off.weights()) == sorted(mem.weights()) and off.meta["device"] == "cpu"
    for name in ("model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
                 "model.language_model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(off.for_weight(name).xtx, mem.for_weight(name).xtx, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(off.heldout_for_weight(name).xtx, mem.heldout_for_weight(name).xtx,
                                   rtol=1e-6, atol=1e-7)


def test_calibration_decides_offload_like_a_run(tiny_tok_dirs, tmp_path, monkeypatch) -> None:
    """No ``offload`` given (the CLI's ``calib``, What-if, the optimizer): a model that would not fit in the
    available memory is captured one layer at a time, never loaded whole."""
    import sahc_core.evaluate.model as model_mod
    import sahc_core.evaluate.offload as offload_mod
    from sahc_core.cache import Cache
    from sahc_core.calib.stats import CalibConfig
    from sahc_core.calib.store import calibration_stats

    monkeypatch.setattr(offload_mod, "available_memory", lambda device="cpu": 1)  # nothing fits
    monkeypatch.setattr(model_mod, "load_model", lambda *a, **k: pytest.fail("loaded the whole model"))
    source = ModelSource.open(tiny_tok_dirs["qwen3_5"])
    cfg = CalibConfig(tokens=96, heldout_tokens=32, window=32)
    stats = calibration_stats(source, Cache(tmp_path / "c.duckdb"), TINY_TEXT * 3, cfg, device="cpu")
    assert "model.language_model.layers.1.mlp.down_proj.weight" in stats.weights()


def test_auto_offload_keeps_the_memory_bound_on_cpu() -> None:
    """On the CPU a model whose in-memory peak would break its memory bound goes layer by layer even
    when RAM would hold it (a 9B-shaped model on a big machine); a small one stays in memory."""
    gib = 2**30
    big = decide_offload("auto", weights_bytes=11 * gib, logits_bytes=gib // 8, available=64 * gib, bound=6 * gib)
    assert big.offload and "above the model's 6.0 GiB memory bound" in big.reason
    small = decide_offload("auto", weights_bytes=gib // 4, logits_bytes=gib // 16, available=64 * gib, bound=2 * gib)
    assert not small.offload and "within the model's" in small.reason
    assert not decide_offload("auto", weights_bytes=11 * gib, logits_bytes=gib // 8, available=64 * gib).offload
