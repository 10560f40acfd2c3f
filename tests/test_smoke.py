"""Forward smoke test: per-layer output cosine of W vs Ŵ, against an independent computation."""
from __future__ import annotations

import pytest
import torch

from sahc_core.errors import ModelError

from sahc_core.evaluate.activations import capture_inputs
from sahc_core.evaluate.model import load_model
from sahc_core.metrics import output_cosine
from sahc_core.evaluate.smoke import layer_output_cosines
from tiny_models import TINY_TEXT


@pytest.fixture(scope="module")
def model_tok(tiny_llama_tok_dir):
    return load_model(tiny_llama_tok_dir, device="cpu")


def test_identity_weights_give_cosine_one(model_tok):
    model, tok = model_tok
    # as a checkpoint stores it: the tied lm_head is not a separate tensor
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    cos = layer_output_cosines(model, tok, TINY_TEXT, state, n_tokens=64)
    # every linear layer + the embedding + the tied lm_head (tested with the embedding weight)
    assert "lm_head.weight" in cos and cos["lm_head.weight"]["weight"] == "model.embed_tokens.weight"
    assert "model.embed_tokens.weight" in cos and "model.layers.1.mlp.down_proj.weight" in cos
    assert all(c["cosine"] == pytest.approx(1.0, abs=1e-6) for c in cos.values())


def test_matches_capture_inputs_then_output_cosine(model_tok):
    model, tok = model_tok
    name = "model.layers.1.mlp.down_proj.weight"
    W = model.state_dict()[name]
    g = torch.Generator().manual_seed(0)
    W_hat = W + 0.5 * W.std() * torch.randn(W.shape, generator=g)
    cos = layer_output_cosines(model, tok, TINY_TEXT, {name: W_hat}, n_tokens=64)
    assert set(cos) == {name}
    X = capture_inputs(model, tok, TINY_TEXT, name.removesuffix(".weight"), n_tokens=64)
    assert cos[name]["tokens"] == X.shape[0]
    assert cos[name]["cosine"] == pytest.approx(output_cosine(W, W_hat, X), abs=1e-6)
    assert cos[name]["cosine"] < 0.99


def test_hooks_are_removed(model_tok):
    model, tok = model_tok
    layer_output_cosines(model, tok, TINY_TEXT, {"model.layers.0.mlp.up_proj.weight": model.model.layers[0].mlp.up_proj.weight},
                         n_tokens=16)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_no_matching_layer_is_an_error(model_tok):
    """A smoke test that compares nothing must not pass silently (the Qwen3.5 name mismatch did)."""
    model, tok = model_tok
    with pytest.raises(ModelError, match="matched no layer"):
        layer_output_cosines(model, tok, TINY_TEXT, {"model.norm.weight": model.model.norm.weight}, n_tokens=16)
    with pytest.raises(ModelError, match="lacks a parameter"):
        layer_output_cosines(model, tok, TINY_TEXT, {"model.visual.blocks.0.qkv.weight": torch.ones(3)}, n_tokens=16)
