"""Tiny, offline, seeded Hugging Face checkpoints used as fixtures by every test module.

The models are built from the real ``transformers`` config/model classes (so tensor names and
shapes are exactly what ``save_pretrained`` writes for that architecture) and saved SHARDED
(``model.safetensors.index.json`` + several ``*.safetensors``). No tokenizer is written.

Usage in tests: the session fixtures ``tiny_llama_dir`` and ``tiny_qwen35_dir`` from
``tests/conftest.py``; or call the builders directly (``from tiny_models import build_tiny_llama``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

#: Seed used for every tiny model so that weights are identical across runs.
SEED = 0

#: MTP (multi-token prediction) head tensors added to the tiny Qwen3.5 checkpoint. transformers does
#: not model the MTP head, so ``save_pretrained`` writes none; the real Qwen3.5 checkpoints store it
#: under ``mtp.*`` with one full-attention decoder layer (gated q_proj: 2 x heads x head_dim rows).
QWEN35_MTP_SHARD = "model-mtp.safetensors"


def tiny_llama_config():
    """Return the ``LlamaConfig`` of the tiny llama fixture (2 layers, hidden 64, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )


def _shard_bytes(model: torch.nn.Module, shards: int) -> int:
    """Max shard size (bytes) that makes ``save_pretrained`` write about ``shards`` files."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return max(1, total // shards + 1)


def _save_seeded(build, directory: str | Path, shards: int):
    """``(out, model)``: ``build()`` under the fixed seed, saved to ``directory`` in ``shards`` shards."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = build()
    model.save_pretrained(out, max_shard_size=_shard_bytes(model, shards))
    return out, model

def build_tiny_llama(directory: str | Path, shards: int = 2) -> Path:
    """Build and save a seeded 2-layer llama model, sharded into (at least) ``shards`` files.

    Parameters
    ----------
    directory : str or Path
        Output directory (created).
    shards : int
        Target number of safetensors shards (>= 2 gives an index file).

    Returns
    -------
    Path
        The model directory (config.json, model-0000k-of-0000n.safetensors, index).
    """
    from transformers import LlamaForCausalLM

    return _save_seeded(lambda: LlamaForCausalLM(tiny_llama_config()), directory, shards)[0]


def tiny_qwen35_config():
    """Return the ``Qwen3_5Config`` of the tiny Qwen3.5 fixture.

    Text model: 2 layers, layer 0 linear attention (Gated DeltaNet), layer 1 full attention;
    hidden 64, intermediate 128, vocab 256, tied embeddings. Vision tower: depth 1, hidden 32.
    """
    from transformers import Qwen3_5Config

    text = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"],
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        num_position_embeddings=16,
        patch_size=4,
    )
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)


def qwen35_mtp_shapes(text_config) -> dict[str, tuple[int, ...]]:
    """Shapes of the MTP head tensors for a Qwen3.5 text config (real checkpoint naming).

    Parameters
    ----------
    text_config : Qwen3_5TextConfig
        The text sub-config.

    Returns
    -------
    dict
        ``{tensor name: shape}`` for ``mtp.fc``, the pre-fc norms, one decoder layer and ``mtp.norm``.
    """
    h = text_config.hidden_size
    i = text_config.intermediate_size
    hd = text_config.head_dim
    nq = text_config.num_attention_heads
    nkv = text_config.num_key_value_heads
    p = "mtp.layers.0."
    return {
        "mtp.fc.weight": (h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (2 * nq * hd, h),  # gated attention: query + gate
        p + "self_attn.k_proj.weight": (nkv * hd, h),
        p + "self_attn.v_proj.weight": (nkv * hd, h),
        p + "self_attn.o_proj.weight": (h, nq * hd),
        p + "self_attn.q_norm.weight": (hd,),
        p + "self_attn.k_norm.weight": (hd,),
        p + "mlp.gate_proj.weight": (i, h),
        p + "mlp.up_proj.weight": (i, h),
        p + "mlp.down_proj.weight": (h, i),
        "mtp.norm.weight": (h,),
    }


def build_tiny_qwen35(directory: str | Path, shards: int = 3) -> Path:
    """Build and save a seeded tiny Qwen3.5 (text + vision) model plus an ``mtp.*`` shard.

    Parameters
    ----------
    directory : str or Path
        Output directory (created).
    shards : int
        Target number of transformers-written shards; one more shard holds the MTP tensors.

    Returns
    -------
    Path
        The model directory.
    """
    from safetensors.torch import save_file
    from transformers import Qwen3_5ForConditionalGeneration

    config = tiny_qwen35_config()
    out, model = _save_seeded(lambda: Qwen3_5ForConditionalGeneration(config), directory, shards)

    gen = torch.Generator().manual_seed(SEED + 1)
    mtp = {
        name: torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
        for name, shape in qwen35_mtp_shapes(config.text_config).items()
    }
    save_file(mtp, str(out / QWEN35_MTP_SHARD), metadata={"format": "pt"})

    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name, tensor in mtp.items():
        index["weight_map"][name] = QWEN35_MTP_SHARD
    meta = index.setdefault("metadata", {})
    meta["total_size"] = int(meta.get("total_size", 0)) + sum(t.numel() * 4 for t in mtp.values())
    if "total_parameters" in meta:
        meta["total_parameters"] = int(meta["total_parameters"]) + sum(t.numel() for t in mtp.values())
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return out


def tiny_gemma3_config():
    """Return the ``Gemma3Config`` of the tiny Gemma 3 fixture (text + SigLIP vision tower + projector).

    Text model: 2 layers (sliding, full attention), hidden 64, vocab 256, tied embeddings. Vision:
    1 layer, hidden 48 (so int4-g128 has no dividing group size there), 8x8 patches of 32x32 images.
    """
    from transformers import Gemma3Config

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=True)


def build_tiny_gemma3(directory: str | Path, shards: int = 2) -> Path:
    """Build and save a seeded tiny Gemma 3 (``Gemma3ForConditionalGeneration``: text, vision, projector).

    ``save_pretrained`` writes the hub naming (``language_model.model.*``, ``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``), not the class's own parameter names (``model.language_model.*``).
    """
    from transformers import Gemma3ForConditionalGeneration

    return _save_seeded(lambda: Gemma3ForConditionalGeneration(tiny_gemma3_config()), directory, shards)[0]


def build_tiny_gpt2(directory: str | Path, shards: int = 2) -> Path:
    """Build and save a seeded 2-layer GPT-2 (``Conv1D`` projections, learned positions, tied head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out, model = _save_seeded(lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                                                 n_positions=128, bos_token_id=0, eos_token_id=0)),
                              directory, shards)
    return out


#: Text the tiny word-level tokenizer is trained on (and a corpus the tiny models can be scored on).
TINY_TEXT = ("to be or not to be that is the question whether tis nobler in the mind to suffer the slings and "
             "arrows of outrageous fortune or to take arms against a sea of troubles and by opposing end them\n") * 6


def with_word_tokenizer(model_dir: str | Path, out: str | Path, text: str = TINY_TEXT) -> Path:
    """Copy ``model_dir`` to ``out`` and add a word-level tokenizer (vocab <= 256) trained in memory on ``text``."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    shutil.copytree(model_dir, out)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=256, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out)
    return out


def randn_bf16(rows: int, cols: int, scale: float = 1.0, seed: int = 0, block: int = 16384) -> torch.Tensor:
    """A seeded Gaussian ``rows x cols`` bf16 matrix built in row blocks (no float32 copy of the whole:
    the peak-RSS tests measure what the code under test adds, not this)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.empty(rows, cols, dtype=torch.bfloat16)
    for a in range(0, rows, block):
        b = min(rows, a + block)
        W[a:b] = torch.randn(b - a, cols, generator=gen) * scale
    return W
