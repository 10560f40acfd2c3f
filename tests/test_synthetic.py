"""Synthetic Qwen3.5-9B-shaped checkpoints (sahc_core/io/synthetic.py): names, shapes, components, values."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_models import qwen35_mtp_shapes, tiny_qwen35_config

from sahc_core.io.components import tensor_table
from sahc_core.io import synthetic
from sahc_core.io.synthetic import (
    qwen35_config,
    qwen35_layer_types,
    qwen35_tensor_shapes,
    random_tensor,
    synthetic_params,
    write_qwen35_like,
)
from sahc_core.io.source import ModelSource

_LAYER = re.compile(r"layers\.(\d+)\.")


def _meta_state_dict(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes transformers' own model would save (built on the meta device: no memory)."""
    from transformers import Qwen3_5ForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3_5ForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")  # tied: saved once, as the embedding
    return shapes


def _expected_component(name: str, layer_types: list[str]) -> str:
    """The component of a Qwen3.5 tensor from the model's structure (not from the classifier's rules)."""
    if name.startswith("mtp."):
        return "mtp"
    if name.startswith("model.visual."):
        return "vision"
    if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        return "embedding"
    m = _LAYER.search(name)
    if m is None or name.endswith("layernorm.weight"):
        return "norm_other"  # final norm; the two per-layer RMSNorms
    if ".mlp." in name:
        return "ffn"
    return {"linear_attention": "attention_linear", "full_attention": "attention_full"}[layer_types[int(m.group(1))]]


def test_layer_pattern_is_three_linear_then_one_full() -> None:
    assert qwen35_layer_types(8) == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"]
    assert qwen35_layer_types(2) == ["linear_attention"] * 2
    assert qwen35_config(32).text_config.layer_types == qwen35_layer_types(32)  # transformers' own default too


@pytest.mark.parametrize("full_size", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_shapes_equal_the_state_dict_transformers_would_save(full_size: bool, tied: bool) -> None:
    config = qwen35_config(4, full_size=full_size, tie_word_embeddings=tied)
    shapes = qwen35_tensor_shapes(config)
    text = {k: v for k, v in shapes.items() if not k.startswith("mtp.")}
    assert list(text.items()) == list(_meta_state_dict(config).items())
    assert {k: v for k, v in shapes.items() if k.startswith("mtp.")} == qwen35_mtp_shapes(config.text_config)


def test_full_size_32_layers_has_the_published_qwen35_9b_parameter_count() -> None:
    """Qwen/Qwen3.5-9B: 9,653,104,368 parameters (lm_head stored, MTP head included)."""
    shapes = qwen35_tensor_shapes(qwen35_config(32))
    assert sum(math.prod(s) for s in shapes.values()) == 9_653_104_368
    assert shapes["model.language_model.embed_tokens.weight"] == (248_320, 4_096)
    assert shapes["model.language_model.layers.0.mlp.gate_proj.weight"] == (12_288, 4_096)
    assert sum(1 for k in shapes if k.endswith("self_attn.q_proj.weight") and k.startswith("model.")) == 8
    assert sum(1 for k in shapes if k.endswith("linear_attn.in_proj_qkv.weight")) == 24


def test_small_checkpoint_opens_and_every_tensor_lands_in_its_component(tmp_path: Path) -> None:
    out = write_qwen35_like(tmp_path / "m", full_size=False, max_shard_bytes=200_000)
    source = ModelSource.open(out)
    config = json.loads((out / "config.json").read_text())
    assert source.architecture == "qwen3_5" and not source.tied_embeddings
    assert len({t.file for t in source.tensors()}) > 1  # sharded, with a consistent index
    layer_types = config["text_config"]["layer_types"]
    table = tensor_table(source)
    assert not table["guessed"].any()
    for row in table.itertuples():
        assert row.component == _expected_component(row.name, layer_types), row.name
    assert set(table["component"]) == {"ffn", "attention_full", "attention_linear", "embedding", "vision", "mtp",
                                       "norm_other"}
    assert synthetic_params(out)["n_params"] == source.num_params
    index = json.loads((out / synthetic.INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel * 2 for t in source.tensors())


def test_small_checkpoint_naming_agrees_with_tiny_models() -> None:
    """Per layer type, the same names and shapes as tests/tiny_models.py (same dims, vision and MTP head)."""
    tiny_config = tiny_qwen35_config()  # 2 layers: linear, full; tied
    theirs = {**_meta_state_dict(tiny_config), **qwen35_mtp_shapes(tiny_config.text_config)}
    ours = qwen35_tensor_shapes(qwen35_config(4, full_size=False, tie_word_embeddings=True))  # L, L, L, F

    def by_kind(shapes: dict, types: list[str]) -> set[tuple[str, tuple[int, ...]]]:
        """(name with ``layers.N.`` of the text model replaced by its layer type, shape)."""
        return {(_LAYER.sub(lambda m: f"layers.{types[int(m.group(1))]}.", k) if k.startswith("model.") else k, v)
                for k, v in shapes.items()}

    assert by_kind(ours, qwen35_layer_types(4)) == by_kind(theirs, tiny_config.text_config.layer_types)


def test_values_are_seeded_scaled_and_stored_in_the_dtype(tmp_path: Path, monkeypatch) -> None:
    out = write_qwen35_like(tmp_path / "a", full_size=False, seed=3, scale=0.05)
    again = write_qwen35_like(tmp_path / "b", full_size=False, seed=3, scale=0.05, max_shard_bytes=10_000)
    name = "model.language_model.embed_tokens.weight"

    def read(d: Path) -> torch.Tensor:
        index = json.loads((d / synthetic.INDEX_NAME).read_text())["weight_map"]
        with safe_open(str(d / index[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    W = read(out)
    assert W.dtype == torch.bfloat16 and torch.equal(W, read(again))  # sharding does not change values
    assert abs(float(W.float().std()) - 0.05) < 0.005 and abs(float(W.float().mean())) < 0.005
    monkeypatch.setattr(synthetic, "_FILL_ELEMENTS", 3 * 64)  # 3 rows at a time: every row still filled
    small_blocks = random_tensor(name, tuple(W.shape), seed=3, scale=0.05)
    assert torch.isfinite(small_blocks.float()).all() and (small_blocks.float().std(dim=1) > 0.02).all()


def test_decay_gives_power_law_column_norms() -> None:
    W = random_tensor("w", (4096, 64), dtype=torch.float32, decay=1.0, scale=0.02)
    norms = W.norm(dim=0)  # ≈ sqrt(4096) * scale_j, scale_j ∝ 1/(j+1)
    ratio = norms[0] / norms[7]
    assert 7.0 < float(ratio) < 9.0
    assert abs(float(W.square().mean().sqrt()) - 0.02) < 0.002


def test_a_partial_checkpoint_has_no_marker(tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "save_file", boom)
    with pytest.raises(OSError):
        write_qwen35_like(tmp_path, full_size=False)
    assert synthetic_params(tmp_path) is None


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="n_layers"):
        qwen35_config(0)
    with pytest.raises(ValueError, match="scale"):
        write_qwen35_like("/nonexistent-never-created", full_size=False, scale=0.0)
