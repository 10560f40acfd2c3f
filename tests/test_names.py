"""Checkpoint -> evaluated-model name maps: against transformers' own loading, and the errors before a run."""
from __future__ import annotations

import pytest
import torch

from sahc_core.errors import ModelError
from sahc_core.evaluate.names import build_name_map, empty_model, family_of, name_map_for
from sahc_core.io.components import tensor_table
from sahc_core.io.source import ModelSource


@pytest.fixture(scope="module")
def fixtures(tiny_llama_dir, tiny_qwen35_dir, tiny_gemma3_dir, tiny_gpt2_dir):
    return {"llama": tiny_llama_dir, "qwen3_5": tiny_qwen35_dir, "gemma3": tiny_gemma3_dir, "gpt2": tiny_gpt2_dir}


@pytest.mark.parametrize("arch", ["llama", "qwen3_5", "gemma3", "gpt2"])
def test_every_evaluated_tensor_is_what_transformers_loads_there(fixtures, arch) -> None:
    """Independent reference: ``from_pretrained`` applies transformers' own key conversion; each mapped
    model parameter must then hold exactly the checkpoint tensor the map names."""
    from transformers import AutoModelForCausalLM

    source = ModelSource.open(fixtures[arch])
    names = name_map_for(source)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    state = model.state_dict()
    assert names.model_class == type(model).__name__
    for ckpt, model_name in names.to_model.items():
        assert torch.equal(state[model_name], source.read(ckpt)), ckpt
    # vision and MTP: exactly the component map's vision/mtp tensors, nothing else left out
    table = tensor_table(source)
    expected = {r.name: r.component for r in table.itertuples() if r.component in ("vision", "mtp")}
    assert names.not_evaluated == expected
    assert len(names.to_model) + len(names.not_evaluated) == len(table)


def test_qwen35_names_and_the_run_note(tiny_qwen35_dir) -> None:
    names = name_map_for(ModelSource.open(tiny_qwen35_dir))
    assert names.family == "qwen3_5" and names.model_class == "Qwen3_5ForCausalLM"
    assert names.model_name("model.language_model.layers.0.linear_attn.in_proj_qkv.weight") == \
        "model.layers.0.linear_attn.in_proj_qkv.weight"
    assert names.checkpoint_name("model.layers.1.self_attn.q_proj.weight") == \
        "model.language_model.layers.1.self_attn.q_proj.weight"
    assert names.model_name("mtp.fc.weight") is None and names.not_evaluated["mtp.fc.weight"] == "mtp"
    d = names.describe()
    assert d["not_evaluated"] == {"mtp": 15, "vision": 21} and "mtp.fc.weight" in d["not_evaluated_tensors"]["mtp"]
    assert "21 vision-tower and 15 MTP-head tensors were compressed" in d["note"]


def test_gpt2_hub_names_without_prefix_map(tiny_gpt2_dir) -> None:
    """Old GPT-2 hub files store ``h.0.attn.c_attn.weight`` (no ``transformer.``) and causal-mask buffers."""
    model = empty_model(tiny_gpt2_dir)
    stored = [t.name for t in ModelSource.open(tiny_gpt2_dir).tensors()]
    old = [n.removeprefix("transformer.") for n in stored] + ["h.0.attn.bias", "h.1.attn.masked_bias"]
    names = build_name_map(old, "gpt2", model)
    assert names.model_name("h.0.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert names.model_name("wte.weight") == "transformer.wte.weight"
    assert names.not_evaluated == {"h.0.attn.bias": "buffer", "h.1.attn.masked_bias": "buffer"}


def test_unmapped_and_missing_names_fail_with_the_names(tiny_qwen35_dir) -> None:
    source = ModelSource.open(tiny_qwen35_dir)
    model = empty_model(tiny_qwen35_dir)
    stored = [t.name for t in source.tensors()]
    with pytest.raises(ModelError, match=r"lacks a parameter for 2 checkpoint tensors.*model\.language_model\.extra"):
        build_name_map(stored + ["model.language_model.extra.weight", "model.language_model.zz.weight"],
                       "qwen3_5", model)
    with pytest.raises(ModelError, match="lacks 1 tensors.*model.norm.weight"):
        build_name_map([n for n in stored if n != "model.language_model.norm.weight"], "qwen3_5", model)
    # without the family's rules (the bug of issue 15: "63 tensors the model lacks") the names are refused up front
    with pytest.raises(ModelError, match="lacks a parameter for 63 checkpoint tensors"):
        build_name_map(stored, "llama", model)
    assert family_of("qwen3_5_moe_text").name == "qwen3_5" and family_of("mistral").name == "decoder"


def test_empty_model_holds_no_weights_but_real_buffers(tiny_gemma3_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = empty_model(tiny_gemma3_dir, "bfloat16")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    ref = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.bfloat16)
    buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        assert b.device.type == "cpu" and torch.equal(b, buffers[name]), name
