"""Layer-by-layer runner: reproduces each model's own logits, dedupes per-layer arguments, calls its turns."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import transformers as tf

from sahc_core.errors import ModelError
from sahc_core.evaluate.layerwise import STEM, capture_layer_inputs, decoder_layers, run_layerwise
from tiny_models import tiny_llama_config, tiny_qwen35_config

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1)


def _qwen35(attn: str = "sdpa") -> torch.nn.Module:
    cfg = tiny_qwen35_config()
    cfg._attn_implementation = cfg.text_config._attn_implementation = attn
    return tf.Qwen3_5ForConditionalGeneration(cfg)


BUILDERS = {
    "llama": lambda: tf.LlamaForCausalLM(tiny_llama_config()),
    "qwen3_5": _qwen35,
    "qwen3_5_eager": lambda: _qwen35("eager"),
    # sliding, sliding, full: two masks and two rotary tables
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **SMALL, head_dim=16, sliding_window=4, final_logit_softcapping=5.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                                                      bos_token_id=0, eos_token_id=0)),
}


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[kind]().eval()


def _windows(model: torch.nn.Module, lengths=(20, 13)) -> list[torch.Tensor]:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_reproduces_the_models_own_logits_and_final_hidden(kind: str) -> None:
    model = _model(kind)
    windows = _windows(model)
    out = run_layerwise(model, windows, logits=True)
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _m, a: head_inputs.append(a[0]))
    with torch.no_grad():
        refs = [model(input_ids=x, use_cache=False).logits for x in windows]
    handle.remove()
    for w in range(len(windows)):
        torch.testing.assert_close(out.logits[w], refs[w], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.hidden[w], head_inputs[w], rtol=1e-5, atol=1e-6)
    assert out.logits[0].abs().max() > 0.1  # a real signal, not two zero tensors


def test_hybrid_layers_get_their_own_arguments_stored_once() -> None:
    model = _model("qwen3_5_eager")  # eager: the full-attention layer gets a 4-D mask, linear attention None
    types = model.config.text_config.layer_types
    inputs = capture_layer_inputs(model, _windows(model))
    for w in range(2):
        assert len(inputs.contexts[w]) == 2 and inputs.which[w] == [types.index(t) for t in types]
        (_, linear), (_, full) = (inputs.call_args(w, types.index(t)) for t in ("linear_attention", "full_attention"))
        assert linear["attention_mask"] is None and full["attention_mask"].dim() == 4
        assert linear["position_embeddings"] is full["position_embeddings"]  # shared, not copied
    assert inputs.contexts[0][0][1]["position_ids"].shape[-1] == 20 and inputs.hidden[1].shape == (1, 13, 64)


def test_gemma3_sliding_and_full_layers_share_by_type() -> None:
    model = _model("gemma3")
    inputs = capture_layer_inputs(model, _windows(model))
    assert inputs.which == [[0, 0, 1], [0, 0, 1]]
    (_, sliding), (_, full) = inputs.contexts[0]
    assert sliding["position_embeddings"] is not full["position_embeddings"]


def test_layer_names_follow_the_model_tree() -> None:
    assert [n for n, _ in decoder_layers(_model("gpt2"))] == ["transformer.h.0", "transformer.h.1"]
    assert [n for n, _ in decoder_layers(_model("qwen3_5"))] == [f"model.language_model.layers.{i}" for i in range(2)]


def test_turns_run_in_order_and_hooks_see_the_real_inputs() -> None:
    model = _model("llama")
    windows = _windows(model)
    target = model.model.layers[1].mlp.down_proj
    ref: list[torch.Tensor] = []
    handle = target.register_forward_pre_hook(lambda _m, a: ref.append(a[0].clone()))
    with torch.no_grad():
        for x in windows:
            model(input_ids=x, use_cache=False)
    handle.remove()
    events: list[tuple] = []
    seen: list[tuple[int, torch.Tensor]] = []

    @contextmanager
    def on_layer(turn):
        events.append(("enter", turn.index, turn.name))
        h = None
        if turn.index == 1:
            h = target.register_forward_pre_hook(lambda _m, a: seen.append((turn.window, a[0].clone())))
        yield
        if h is not None:
            h.remove()
        events.append(("exit", turn.index))

    @contextmanager
    def prepare(turn):
        events.append(("prepare", turn.index))
        yield

    run_layerwise(model, windows, on_layer, prepare=prepare)
    assert events == [("prepare", STEM), ("prepare", 0), ("enter", 0, "model.layers.0"), ("exit", 0),
                      ("prepare", 1), ("enter", 1, "model.layers.1"), ("exit", 1),
                      ("prepare", STEM), ("prepare", 2), ("enter", 2, "lm_head"), ("exit", 2)]
    assert [w for w, _ in seen] == [0, 1]
    for (_, x), r in zip(seen, ref):
        torch.testing.assert_close(x, r, rtol=1e-5, atol=1e-6)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all("forward" not in vars(layer) for _, layer in decoder_layers(model))  # stubs removed


def test_a_model_without_a_layer_list_is_refused() -> None:
    model = _model("llama")
    model.config.num_hidden_layers = 5  # no list of 5 layers under the decoder
    with pytest.raises(ModelError, match="cannot find the decoder layers"):
        run_layerwise(model, _windows(model))


def test_stubs_are_removed_when_the_head_turn_fails() -> None:
    model = _model("llama")

    @contextmanager
    def on_layer(turn):
        if turn.index == 2:  # the head turn runs the model with its layers stubbed
            raise RuntimeError("boom")
        yield

    with pytest.raises(RuntimeError, match="boom"):
        run_layerwise(model, _windows(model), on_layer)
    assert all("forward" not in vars(layer) for _, layer in decoder_layers(model))
    x = _windows(model)[0]
    with torch.no_grad():
        torch.testing.assert_close(run_layerwise(model, [x], logits=True).logits[0], model(input_ids=x).logits)
