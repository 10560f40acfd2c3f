"""Fisher sensitivities: the Monte-Carlo estimate against the exact Gauss-Newton trace, caching, tied usages."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sahc_core.cache import Cache
from sahc_core.io.source import ModelSource
from sahc_core.plans.sensitivity import SensitivityConfig, fisher_sensitivity, sensitivities

N_TOK = 8


class _HexTokenizer:
    """Token id = one hex digit of the text (a 16-word vocabulary for the micro model)."""

    def __call__(self, text: str, **_: object) -> dict:
        return {"input_ids": [int(c, 16) for c in text if c in "0123456789abcdef"]}


@pytest.fixture(scope="module")
def micro():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), _HexTokenizer(), "3a7f019c"


def _exact_per_position(model, ids: torch.Tensor, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E‖g_p‖², ‖y_p‖²)`` per position p, exactly: E over labels sampled from the model of
    ‖∂ℓ/∂y_p‖² is Σ_n tr(J_np J_npᵀ Σ_n), J_np the Jacobian of position n's logits w.r.t. y_p and
    Σ_n = diag(p_n) − p_n p_nᵀ (the softmax cross-entropy's Hessian in the logits)."""
    module = model.get_submodule(module_name)
    box: dict[str, torch.Tensor] = {}

    def capture(_m, _a, out):
        box["y"] = out.detach().clone()

    h = module.register_forward_hook(capture)
    with torch.no_grad():
        logits0 = model(input_ids=ids).logits[0]
    h.remove()
    y0 = box["y"]

    def logits_of(y: torch.Tensor) -> torch.Tensor:
        h = module.register_forward_hook(lambda _m, _a, _o: y)
        try:
            return model(input_ids=ids).logits[0]
        finally:
            h.remove()

    J = torch.autograd.functional.jacobian(logits_of, y0)  # (N, V, 1, N, m)
    n, v = logits0.shape
    J = J.reshape(n, v, n, -1).double()
    p = F.softmax(logits0.double(), dim=-1)
    g2 = torch.zeros(n, dtype=torch.float64)
    for k in range(n):
        sigma = torch.diag(p[k]) - torch.outer(p[k], p[k])
        for q in range(n):
            g2[q] += torch.trace(J[k, :, q] @ J[k, :, q].T @ sigma)
    return g2, y0.double().reshape(n, -1).square().sum(-1)


@pytest.mark.parametrize("module", ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj"])
def test_monte_carlo_fisher_matches_the_exact_gauss_newton_terms(micro, module):
    model, tok, text = micro
    g2, y2 = _exact_per_position(model, torch.tensor([tok(text)["input_ids"]]), module)
    draws = pd.DataFrame([fisher_sensitivity(model, tok, text, SensitivityConfig(tokens=N_TOK, window=N_TOK, seed=s))
                          .set_index("module").loc[module] for s in range(60)])
    for col, exact in (("grad2", float(g2.sum())), ("grad_out", float((g2 * y2).sum()))):
        sem = draws[col].std(ddof=1) / math.sqrt(len(draws))
        assert abs(draws[col].mean() - exact) < 4 * sem, (col, draws[col].mean(), exact, sem)  # unbiased (CLT)
    row = draws.iloc[0]
    assert row["out2"] == pytest.approx(float(y2.sum()), rel=1e-5)
    m = model.get_submodule(module).out_features
    assert row["sensitivity"] == pytest.approx(row["grad_out"] / (2 * m * N_TOK), rel=1e-9)


def test_parameters_are_left_untouched(micro):
    model, tok, text = micro
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher_sensitivity(model, tok, text, SensitivityConfig(tokens=N_TOK, window=4))
    assert all(torch.equal(before[n], p) and p.grad is None and p.requires_grad == flags[n]
               for n, p in model.named_parameters())


def test_tied_embedding_has_a_lookup_and_a_head_usage(micro):
    model, tok, text = micro
    df = fisher_sensitivity(model, tok, text, SensitivityConfig(tokens=N_TOK, window=N_TOK))
    tied = df[df["weight"] == "model.embed_tokens.weight"].set_index("module")
    assert set(tied.index) == {"model.embed_tokens", "lm_head"}
    assert tied.loc["model.embed_tokens", "kind"] == "embedding" and tied.loc["lm_head", "kind"] == "linear"
    assert (df["sensitivity"] > 0).all() and len(df) == 9  # q, k, v, o, gate, up, down, the lookup, the head
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        fisher_sensitivity(model, tok, "z", SensitivityConfig(tokens=8, window=8))


def test_sensitivities_are_measured_once_then_read_from_the_cache(tiny_llama_tok_dir, tmp_path):
    from sahc_core.evaluate.model import load_model

    from tiny_models import TINY_TEXT

    source, cache = ModelSource.open(tiny_llama_tok_dir), Cache(tmp_path / "c.duckdb")
    cfg = SensitivityConfig(tokens=64, window=32)
    first = sensitivities(source, cache, TINY_TEXT, cfg, load=lambda: load_model(tiny_llama_tok_dir, device="cpu"))

    def no_load():
        raise AssertionError("a cached sensitivity must not load the model")

    again = sensitivities(source, cache, TINY_TEXT, cfg, load=no_load)
    assert first.attrs["cached"] is False and again.attrs["cached"] is True
    pd_equal = first.reset_index(drop=True).equals(again.reset_index(drop=True))
    assert pd_equal
    other = sensitivities(source, cache, TINY_TEXT, SensitivityConfig(tokens=64, window=32, seed=1),
                          load=lambda: load_model(tiny_llama_tok_dir, device="cpu"))
    assert other.attrs["cached"] is False  # another seed is another key
