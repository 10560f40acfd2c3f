"""Tests for sahc_core.io.components: name -> component map, tensor table, parameter shares."""
from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sahc_core.io.components import (
    Component,
    TensorRole,
    _table,
    classify,
    component_shares,
    is_known_architecture,
    shares_from_shapes,
    tensor_table,
)
from sahc_core.io.source import ModelSource
from tiny_models import qwen35_mtp_shapes, tiny_llama_config, tiny_qwen35_config

F, AF, AL, E, V, M, N = (Component.FFN, Component.ATTENTION_FULL, Component.ATTENTION_LINEAR, Component.EMBEDDING,
                         Component.VISION, Component.MTP, Component.NORM_OTHER)


def _shares(table: pd.DataFrame) -> dict[str, int]:
    return dict(zip(component_shares(table)["component"], component_shares(table)["params"]))


# ----------------------------------------------------------------------------- exact counts


def _attention_params(h: int, nq: int, nkv: int, hd: int, q_gate: bool, qk_norm: bool) -> int:
    q_rows = nq * hd * (2 if q_gate else 1)
    return h * q_rows + 2 * h * nkv * hd + nq * hd * h + (2 * hd if qk_norm else 0)


def test_tiny_llama_counts_from_config(tiny_llama_dir):
    c = tiny_llama_config()
    h, i, L, V_ = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    hd = h // c.num_attention_heads
    expected = {
        "ffn": L * 3 * h * i,
        "attention_full": L * _attention_params(h, c.num_attention_heads, c.num_key_value_heads, hd, False, False),
        "embedding": V_ * h,  # tied: stored once
        "norm_other": (2 * L + 1) * h,
    }
    table = tensor_table(ModelSource.open(tiny_llama_dir))
    assert _shares(table) == expected
    shares = component_shares(table)
    assert shares["share"].sum() == pytest.approx(1.0)
    assert list(shares["params"]) == sorted(shares["params"], reverse=True)
    assert shares.set_index("component").loc["ffn", "share"] == pytest.approx(expected["ffn"] / sum(expected.values()))
    assert not table["guessed"].any()


def _qwen35_expected(cfg) -> dict[str, int]:
    """Per-component parameter counts of the tiny Qwen3.5 fixture from its config numbers."""
    t, v = cfg.text_config, cfg.vision_config
    h, i, hd = t.hidden_size, t.intermediate_size, t.head_dim
    n_full = t.layer_types.count("full_attention")
    n_lin = t.layer_types.count("linear_attention")
    key_dim = t.linear_num_key_heads * t.linear_key_head_dim
    val_dim = t.linear_num_value_heads * t.linear_value_head_dim
    conv_dim = 2 * key_dim + val_dim
    nv = t.linear_num_value_heads
    linear = (conv_dim * h + val_dim * h + 2 * nv * h  # in_proj_qkv, in_proj_z, in_proj_a, in_proj_b
              + conv_dim * t.linear_conv_kernel_dim + 2 * nv + t.linear_value_head_dim  # conv1d, A_log, dt_bias, norm
              + h * val_dim)  # out_proj
    full = _attention_params(h, t.num_attention_heads, t.num_key_value_heads, hd, True, True)
    hv, iv, m2 = v.hidden_size, v.intermediate_size, v.spatial_merge_size ** 2
    patch = hv * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 + hv
    block = 4 * hv + (3 * hv * hv + 3 * hv) + (hv * hv + hv) + (iv * hv + iv) + (hv * iv + hv)
    merger = 2 * hv + (hv * m2) ** 2 + hv * m2 + v.out_hidden_size * hv * m2 + v.out_hidden_size
    mtp = 2 * h * h + 2 * h + full + 3 * h * i + 2 * h + h  # fc, pre-fc norms, layer, layer norms, final norm
    return {
        "ffn": t.num_hidden_layers * 3 * h * i,
        "attention_full": n_full * full,
        "attention_linear": n_lin * linear,
        "embedding": t.vocab_size * h,  # tied: no lm_head stored
        "vision": patch + v.num_position_embeddings * hv + v.depth * block + merger,
        "mtp": mtp,
        "norm_other": (2 * t.num_hidden_layers + 1) * h,
    }


def test_tiny_qwen35_counts_from_config(tiny_qwen35_dir):
    table = tensor_table(ModelSource.open(tiny_qwen35_dir))
    assert _shares(table) == _qwen35_expected(tiny_qwen35_config())
    assert not table["guessed"].any()
    lin = table[table["component"] == "attention_linear"]
    assert set(lin["kind"]) == {"in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "conv1d", "A_log", "dt_bias",
                                "norm", "out_proj"}
    assert set(lin["layer"]) == {0}
    full = table[table["component"] == "attention_full"]
    assert set(full["kind"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
    assert set(full["layer"]) == {1}


def test_table_columns_and_types(tiny_qwen35_dir):
    src = ModelSource.open(tiny_qwen35_dir)
    table = tensor_table(src)
    assert list(table.columns[:8]) == ["name", "shape", "dtype", "params", "component", "kind", "layer", "file"]
    assert str(table["layer"].dtype) == "Int64"
    assert list(table["name"]) == [t.name for t in src.tensors()]
    row = table.set_index("name").loc["model.language_model.layers.0.linear_attn.conv1d.weight"]
    assert row["shape"] == (128, 1, 4) and row["params"] == 512 and row["dtype"] == "F32" and row["layer"] == 0
    assert pd.isna(table.set_index("name").loc["model.language_model.norm.weight", "layer"])
    assert table["params"].sum() == src.num_params


# ----------------------------------------------------------------------------- names per architecture


@pytest.mark.parametrize(
    ("name", "arch", "role"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "llama", TensorRole(AF, "q_proj", 3)),
        ("model.layers.3.mlp.down_proj.weight", "mistral", TensorRole(F, "down_proj", 3)),
        ("model.layers.0.input_layernorm.weight", "llama", TensorRole(N, "input_layernorm", 0)),
        ("model.layers.0.post_attention_layernorm.weight", "qwen3", TensorRole(N, "post_attention_layernorm", 0)),
        ("model.layers.2.self_attn.k_proj.bias", "qwen2", TensorRole(AF, "k_proj", 2)),
        ("model.layers.2.self_attn.q_norm.weight", "qwen3", TensorRole(AF, "q_norm", 2)),
        ("model.embed_tokens.weight", "llama", TensorRole(E, "embed_tokens", None)),
        ("lm_head.weight", "qwen3", TensorRole(E, "lm_head", None)),
        ("model.norm.weight", "llama", TensorRole(N, "norm", None)),
        ("model.language_model.layers.4.linear_attn.in_proj_qkv.weight", "qwen3_5", TensorRole(AL, "in_proj_qkv", 4)),
        ("model.language_model.layers.4.linear_attn.A_log", "qwen3_5", TensorRole(AL, "A_log", 4)),
        ("model.language_model.layers.4.linear_attn.dt_bias", "qwen3_5", TensorRole(AL, "dt_bias", 4)),
        ("model.language_model.layers.4.linear_attn.norm.weight", "qwen3_5", TensorRole(AL, "norm", 4)),
        ("model.language_model.layers.7.self_attn.o_proj.weight", "qwen3_5", TensorRole(AF, "o_proj", 7)),
        ("model.layers.4.linear_attn.conv1d.weight", "qwen3_5_text", TensorRole(AL, "conv1d", 4)),
        ("model.language_model.layers.1.mlp.experts.gate_up_proj", "qwen3_5_moe", TensorRole(F, "gate_up_proj", 1)),
        ("model.language_model.layers.1.mlp.experts.5.up_proj.weight", "qwen3_5_moe", TensorRole(F, "up_proj", 1)),
        ("model.language_model.layers.1.mlp.gate.weight", "qwen3_5_moe", TensorRole(F, "gate", 1)),
        ("model.language_model.layers.1.mlp.shared_expert_gate.weight", "qwen3_5_moe",
         TensorRole(F, "shared_expert_gate", 1)),
        ("model.visual.blocks.2.attn.qkv.weight", "qwen3_5", TensorRole(V, "qkv", 2)),
        ("model.visual.merger.linear_fc1.weight", "qwen3_5", TensorRole(V, "linear_fc1", None)),
        ("mtp.fc.weight", "qwen3_5", TensorRole(M, "fc", None)),
        ("mtp.layers.0.self_attn.q_proj.weight", "qwen3_5", TensorRole(M, "q_proj", 0)),
        ("mtp.pre_fc_norm_hidden.weight", "qwen3_5", TensorRole(M, "pre_fc_norm_hidden", None)),
        ("model.language_model.layers.0.pre_feedforward_layernorm.weight", "gemma3",
         TensorRole(N, "pre_feedforward_layernorm", 0)),
        ("model.vision_tower.encoder.layers.0.self_attn.q_proj.weight", "gemma3", TensorRole(V, "q_proj", 0)),
        ("model.multi_modal_projector.mm_input_projection_weight", "gemma3",
         TensorRole(V, "mm_input_projection_weight", None)),
        ("language_model.model.layers.5.mlp.gate_proj.weight", "gemma3", TensorRole(F, "gate_proj", 5)),
        ("vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight", "gemma3", TensorRole(V, "fc1", 1)),
        ("multi_modal_projector.mm_soft_emb_norm.weight", "gemma3", TensorRole(V, "mm_soft_emb_norm", None)),
        ("language_model.lm_head.weight", "gemma3", TensorRole(E, "lm_head", None)),
        ("transformer.h.1.attn.c_attn.weight", "gpt2", TensorRole(AF, "c_attn", 1)),
        ("transformer.h.1.attn.c_proj.bias", "gpt2", TensorRole(AF, "c_proj", 1)),
        ("transformer.h.1.mlp.c_proj.weight", "gpt2", TensorRole(F, "c_proj", 1)),
        ("transformer.h.1.mlp.c_fc.weight", "gpt2", TensorRole(F, "c_fc", 1)),
        ("transformer.h.1.ln_2.weight", "gpt2", TensorRole(N, "ln_2", 1)),
        ("transformer.wte.weight", "gpt2", TensorRole(E, "embed_tokens", None)),
        ("transformer.wpe.weight", "gpt2", TensorRole(E, "embed_positions", None)),
        ("transformer.ln_f.bias", "gpt2", TensorRole(N, "ln_f", None)),
    ],
)
def test_classify_known_names(name, arch, role):
    assert is_known_architecture(arch)
    assert classify(name, arch) == role


def _tiny_hf_models():
    """(architecture, model class, config) for every known family, built on the meta device."""
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    q35_text = dict(small, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=1,
                    linear_num_value_heads=2, layer_types=["linear_attention", "full_attention"])
    vis = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32)
    moe_text = {k: v for k, v in q35_text.items() if k != "intermediate_size"}
    moe_text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16)
    return [
        ("llama", tf.LlamaForCausalLM, tf.LlamaConfig(**small, tie_word_embeddings=True)),
        ("mistral", tf.MistralForCausalLM, tf.MistralConfig(**small, tie_word_embeddings=False)),
        ("qwen2", tf.Qwen2ForCausalLM, tf.Qwen2Config(**small)),
        ("qwen3", tf.Qwen3ForCausalLM, tf.Qwen3Config(**small, head_dim=16)),
        ("qwen3_5_text", tf.Qwen3_5ForCausalLM, tf.Qwen3_5TextConfig(**q35_text)),
        ("qwen3_5", tf.Qwen3_5ForConditionalGeneration, tf.Qwen3_5Config(text_config=q35_text, vision_config=vis)),
        ("qwen3_5_moe", tf.Qwen3_5MoeForConditionalGeneration,
         tf.Qwen3_5MoeConfig(text_config=moe_text, vision_config=vis)),
        ("gemma3_text", tf.Gemma3ForCausalLM, tf.Gemma3TextConfig(**small, head_dim=16)),
        ("gemma3", tf.Gemma3ForConditionalGeneration,
         tf.Gemma3Config(text_config=dict(small, head_dim=16), mm_tokens_per_image=4,
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=8))),
        ("gpt2", tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)),
    ]


def _params_by_module_class(model: nn.Module) -> dict[str, int]:
    """Independent reference: component from the *module classes* of the model tree, not from names."""
    out: dict[str, int] = defaultdict(int)
    head = model.get_output_embeddings()
    seen: set[int] = set()

    def walk(module: nn.Module, comp: Component | None) -> None:
        cls = type(module).__name__
        if comp is None:
            if cls.endswith(("VisionModel", "MultiModalProjector")):
                comp = V
            elif "GatedDeltaNet" in cls:
                comp = AL
            elif cls.endswith("Attention"):
                comp = AF
            elif cls.endswith("MLP") or "SparseMoeBlock" in cls:
                comp = F
            elif isinstance(module, nn.Embedding) or module is head:
                comp = E
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # a tied LM head is the embedding's own Parameter
                seen.add(id(p))
                out[(comp or N).value] += p.numel()
        for child in module.children():
            walk(child, comp)

    walk(model, None)
    return dict(out)


@pytest.mark.parametrize("arch", [a for a, _, _ in _tiny_hf_models()])
def test_component_params_match_module_tree(arch):
    """Names transformers really writes: shares by name rules == shares by module classes."""
    _, cls, cfg = next(m for m in _tiny_hf_models() if m[0] == arch)
    with torch.device("meta"):
        model = cls(cfg)
    stored = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied head appears once
    assert set(model.state_dict()) - set(stored) <= {"lm_head.weight"}
    tied = "lm_head.weight" not in stored
    table_shares = dict(zip(*shares_from_shapes(stored, arch, tied)[["component", "params"]].to_numpy().T))
    assert {k: int(v) for k, v in table_shares.items()} == _params_by_module_class(model)
    assert is_known_architecture(arch)


# ----------------------------------------------------------------------------- unknown architectures


@pytest.mark.parametrize(
    ("name", "component", "kind"),
    [
        ("layers.0.attention.wq.weight", AF, "wq"),
        ("layers.0.feed_forward.w1.weight", F, "w1"),
        ("layers.0.attention_norm.weight", N, "attention_norm"),
        ("tok_embeddings.weight", E, "embed_tokens"),
        ("output.weight", E, "lm_head"),
        ("gpt_neox.layers.1.attention.query_key_value.weight", AF, "query_key_value"),
        ("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", F, "dense_h_to_4h"),
        ("gpt_neox.embed_in.weight", E, "embed_tokens"),
        ("embed_out.weight", E, "lm_head"),
        ("backbone.blocks.3.q_proj.weight", AF, "q_proj"),
        ("backbone.blocks.3.fc2.bias", F, "fc2"),
    ],
)
def test_unknown_architecture_heuristics(name, component, kind):
    assert not is_known_architecture("mystery_lm")
    role = classify(name, "mystery_lm")
    assert (role.component, role.kind) == (component, kind)


def test_unknown_architecture_table_is_marked_guessed(tiny_llama_dir, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "mystery_lm"
    (model / "config.json").write_text(json.dumps(cfg))
    table = tensor_table(ModelSource.open(model))
    assert table["guessed"].all()
    assert _shares(table) == _shares(tensor_table(ModelSource.open(tiny_llama_dir)))  # same name rules


def test_unmatched_name_goes_to_norm_other_and_is_guessed():
    shapes = {"model.layers.0.mlp.up_proj.weight": (8, 4), "model.rotary_thing.inv_freq": (2,)}
    table = _table(((n, s, "F32", "f") for n, s in shapes.items()), "llama", False)
    assert list(table["guessed"]) == [False, True]
    shares = component_shares(table)
    assert dict(zip(shares["component"], shares["params"])) == {"ffn": 32, "norm_other": 2}
    assert classify("model.rotary_thing.inv_freq", "llama") == TensorRole(N, "inv_freq", None)


# ----------------------------------------------------------------------------- tied embeddings


def _with_stored_lm_head(src_dir, tmp_path, tie: bool):
    model = tmp_path / f"m{tie}"
    shutil.copytree(src_dir, model)
    emb = ModelSource.open(model).read("model.embed_tokens.weight")
    save_file({"lm_head.weight": emb.clone()}, str(model / "head.safetensors"))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((model / "config.json").read_text())
    cfg["tie_word_embeddings"] = tie
    (model / "config.json").write_text(json.dumps(cfg))
    return ModelSource.open(model)


def test_tied_config_with_stored_lm_head_counts_once(tiny_llama_dir, tmp_path):
    c = tiny_llama_config()
    table = tensor_table(_with_stored_lm_head(tiny_llama_dir, tmp_path, tie=True))
    head = table.set_index("name").loc["lm_head.weight"]
    assert bool(head["tied"]) and bool(head["duplicate"])
    emb_row = component_shares(table).set_index("component").loc["embedding"]
    assert emb_row["params"] == c.vocab_size * c.hidden_size and emb_row["n_tensors"] == 1


def test_untied_stored_lm_head_counts_twice(tiny_llama_dir, tmp_path):
    c = tiny_llama_config()
    table = tensor_table(_with_stored_lm_head(tiny_llama_dir, tmp_path, tie=False))
    assert not table["tied"].any() and not table["duplicate"].any()
    emb_row = component_shares(table).set_index("component").loc["embedding"]
    assert emb_row["params"] == 2 * c.vocab_size * c.hidden_size and emb_row["n_tensors"] == 2


def test_tied_without_stored_lm_head_marks_embedding(tiny_llama_dir):
    table = tensor_table(ModelSource.open(tiny_llama_dir))
    assert list(table.loc[table["tied"], "name"]) == ["model.embed_tokens.weight"]
    assert not table["duplicate"].any()


# ----------------------------------------------------------------------------- Qwen3.5-9B vs the study


def test_qwen35_9b_shares_vs_reference_study():
    """Real Qwen3.5-9B shapes (meta device, no weights) against the study's section-1 table.

    Findings (asserted below):
    - transformers' Qwen3_5TextConfig defaults ARE the 9B text model (hidden 4096, intermediate 12288,
      32 layers = 24 Gated-DeltaNet + 8 full attention, vocab 248320, untied LM head). The vision
      merger must project to the text width, so out_hidden_size=4096 is set explicitly.
    - The LM head is a separate tensor in the 9B (text params 8.954 B with it, which matches the
      8.95 B that llama.cpp reports for the 9B GGUF), so "Emb + LM Head" = 2 x 248320 x 4096 is
      right; the study's remark that they are tied is wrong but its count is not double.
    - Our total is 9.653 B; the study's shares imply about 8.92 B (FFN 4.832 B / 54.2 %). Its FFN,
      Emb+LM head and Vision+MTP columns agree with our parameter counts over that total; its
      full-attention 3.8 % counts q_proj without the output gate half (16 heads x 256, not x 2), and
      its linear-attention 11.3 % (about 1.0 B) is about 0.61 B short of the real Gated-DeltaNet
      projections (in_proj_qkv 8192x4096 + in_proj_z + out_proj 4096x4096 + a/b/conv per layer).
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig

    text = Qwen3_5TextConfig()
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size) == (4096, 12288, 32,
                                                                                                    248320)
    assert text.layer_types.count("full_attention") == 8 and text.layer_types.count("linear_attention") == 24
    assert text.tie_word_embeddings is False
    cfg = Qwen3_5Config(text_config=text.to_dict(), vision_config=dict(out_hidden_size=4096), tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update(qwen35_mtp_shapes(cfg.text_config))
    shares = shares_from_shapes(shapes, "qwen3_5", tied=False).set_index("component")
    p = shares["params"].to_dict()
    total = sum(p.values())

    h, i, V_, L = 4096, 12288, 248320, 32
    assert p["ffn"] == L * 3 * h * i
    assert p["embedding"] == 2 * V_ * h
    assert p["attention_full"] == 8 * (h * 2 * 16 * 256 + 2 * h * 4 * 256 + 16 * 256 * h + 2 * 256)
    assert total - p["vision"] - p["mtp"] == pytest.approx(8.954e9, rel=1e-3)  # GGUF text-only count

    # Our shares of the real model (percent, 0.1 precision).
    ours = {k: round(100 * v / total, 1) for k, v in p.items()}
    assert ours["ffn"] == 50.1 and ours["embedding"] == 21.1 and ours["attention_linear"] == 16.8
    assert ours["attention_full"] == 4.9 and round(100 * (p["vision"] + p["mtp"]) / total, 1) == 7.2

    # The study's accounting: its total from its FFN share; other columns checked against it.
    study_total = p["ffn"] / 0.542
    assert study_total == pytest.approx(8.915e9, rel=1e-3)
    assert 100 * p["embedding"] / study_total == pytest.approx(22.8, abs=0.05)
    assert 100 * (p["vision"] + p["mtp"]) / study_total == pytest.approx(7.9, abs=0.1)
    ungated_full = 8 * (h * 16 * 256 + 2 * h * 4 * 256 + 16 * 256 * h)
    assert 100 * ungated_full / study_total == pytest.approx(3.8, abs=0.05)
    assert 100 * p["attention_linear"] / study_total == pytest.approx(18.1, abs=0.05)  # study: 11.3
    assert p["attention_linear"] - 0.113 * study_total == pytest.approx(0.61e9, rel=0.02)
