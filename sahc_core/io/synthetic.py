"""Synthetic Qwen3.5-9B-shaped checkpoints, written shard by shard in bounded memory.

:func:`write_qwen35_like` writes a Hugging Face model directory (``config.json``,
``model-0000k-of-0000N.safetensors``, ``model.safetensors.index.json``) whose tensor NAMES, shapes
and dtypes are those of the real ``Qwen/Qwen3.5-9B`` checkpoint, with random values, for any number
of text layers. It never builds a torch model: shapes come from :func:`qwen35_tensor_shapes`
(closed-form from the config), each tensor is filled a row block at a time, and at most one shard is
held in memory. ``full_size=False`` keeps the names with tiny dimensions (tests).

Naming and shapes (sources):

* ``transformers`` 5.24 ``models/qwen3_5/modeling_qwen3_5.py``: ``Qwen3_5ForConditionalGeneration``
  holds ``model.visual`` (patch_embed Conv3d, pos_embed, ``blocks.N.{norm1,norm2,attn.qkv,attn.proj,
  mlp.linear_fc1,mlp.linear_fc2}``, merger), ``model.language_model`` (``embed_tokens``,
  ``layers.N.{linear_attn|self_attn,mlp,input_layernorm,post_attention_layernorm}``, ``norm``) and
  ``lm_head``; the gated full attention's ``q_proj`` has 2 x heads x head_dim rows.
  ``conversion_mapping.py`` maps ``qwen3_5`` checkpoints with no renaming (and strips
  ``language_model`` only for the text-only ``qwen3_5_text``), so the stored names ARE these names.
* ``mtp.*`` (not modelled by transformers, ``_keys_to_ignore_on_load_unexpected = [r"^mtp.*"]``):
  vLLM ``models/qwen3_5_mtp.py`` (``fc`` 2h -> h, ``pre_fc_norm_embedding``, ``pre_fc_norm_hidden``,
  ``layers.0`` a full-attention decoder layer, ``norm``), as in ``tests/tiny_models.py``.
* Tied or not: the published parameter count of Qwen3.5-9B, 9,653,104,368, is exactly what these
  shapes give with 32 layers, ``lm_head`` stored separately and the MTP head (8,635,985,648 if the
  LM head were tied), and 2 bytes x that = 19.3 GB is the checkpoint's size. So the real 9B stores
  ``lm_head.weight`` (``tie_word_embeddings: false``); ``tie_word_embeddings=True`` writes the
  tied variant (the smaller Qwen3.5 models), the embedding stored once.

Config: ``Qwen3_5Config`` defaults, which are the 9B text dimensions (vocab 248,320, hidden 4,096,
FFN 12,288, 16/4 heads of 256, Gated DeltaNet 16 QK / 32 V heads of 128) and the 27-block vision
tower, plus what the defaults do not hold: ``out_hidden_size`` 4,096 (the merger feeds the text
hidden size), ``layer_types`` 3 x linear_attention then 1 x full_attention repeating (the
``full_attention_interval`` 4 default), ``mtp_num_hidden_layers`` 1, 262,144 positions and the
rope of the published GGUF metadata (theta 1e7, 64 of 256 rotary dims, mrope sections 11/11/10).

No tokenizer is written: ``inspect``, ``spectrum``, ``scan``, ``measure``, ``sweep`` and ``plan``
read weights only. ``ppl`` and ``run`` also need a tokenizer whose ids are < 248,320 (e.g. copy
``tokenizer.json`` + ``tokenizer_config.json`` from Qwen/Qwen3.5-9B, or add a small word-level one as
``tests/tiny_models.with_word_tokenizer`` does), and they instantiate the whole model in torch.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

#: Std of the random weights (the usual initializer range of these models).
DEFAULT_SCALE = 0.02
#: Largest shard written (bytes); the generator holds at most one shard in memory.
DEFAULT_SHARD_BYTES = 2_500_000_000
#: Elements generated at a time in float32 while filling one tensor (64 MiB).
_FILL_ELEMENTS = 16 * 2**20
#: Written last, after every shard and the index: its presence marks a complete checkpoint.
MARKER_NAME = "sahc_synthetic.json"
INDEX_NAME = "model.safetensors.index.json"

_TINY_TEXT = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  max_position_embeddings=128)
_TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    num_position_embeddings=16, patch_size=4)
_REAL_TEXT = dict(max_position_embeddings=262_144,
                  rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                                   "mrope_section": [11, 11, 10], "mrope_interleaved": True})


def qwen35_layer_types(n_layers: int) -> list[str]:
    """The Qwen3.5 layer pattern for ``n_layers`` text layers: 3 linear_attention, 1 full_attention, repeating."""
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n_layers)]


def qwen35_config(n_layers: int = 4, *, full_size: bool = True, tie_word_embeddings: bool = False):
    """``Qwen3_5Config`` of the synthetic checkpoint (see the module docstring for what is not a default).

    Parameters
    ----------
    n_layers : int
        Text decoder layers (the real 9B has 32).
    full_size : bool
        Real 9B dimensions; ``False`` gives the tiny dimensions of ``tests/tiny_models.py``.
    tie_word_embeddings : bool
        ``False`` as in Qwen3.5-9B (``lm_head.weight`` stored); ``True`` stores the embedding once.
    """
    from transformers import Qwen3_5Config

    if not (isinstance(n_layers, int) and n_layers >= 1):
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}.")
    text = dict(_REAL_TEXT) if full_size else dict(_TINY_TEXT)
    text.update(num_hidden_layers=n_layers, layer_types=qwen35_layer_types(n_layers),
                tie_word_embeddings=tie_word_embeddings, mtp_num_hidden_layers=1)
    vision = {"out_hidden_size": 4096} if full_size else dict(_TINY_VISION)
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
                         architectures=["Qwen3_5ForConditionalGeneration"], dtype="bfloat16")


def _decoder_layer(prefix: str, t, kind: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one text decoder layer (``kind`` = the layer type) under ``prefix``."""
    h, i = t.hidden_size, t.intermediate_size
    out: dict[str, tuple[int, ...]] = {}
    if kind == "linear_attention":  # Qwen3_5GatedDeltaNet
        key_dim = t.linear_key_head_dim * t.linear_num_key_heads
        value_dim = t.linear_value_head_dim * t.linear_num_value_heads
        conv_dim = 2 * key_dim + value_dim  # q, k, v go through the depthwise conv
        nv = t.linear_num_value_heads
        a = prefix + "linear_attn."
        out.update({a + "dt_bias": (nv,), a + "A_log": (nv,),
                    a + "conv1d.weight": (conv_dim, 1, t.linear_conv_kernel_dim),
                    a + "norm.weight": (t.linear_value_head_dim,), a + "out_proj.weight": (h, value_dim),
                    a + "in_proj_qkv.weight": (conv_dim, h), a + "in_proj_z.weight": (value_dim, h),
                    a + "in_proj_b.weight": (nv, h), a + "in_proj_a.weight": (nv, h)})
    else:  # Qwen3_5Attention: gated, q_proj gives query and gate
        hd, nq, nkv = t.head_dim, t.num_attention_heads, t.num_key_value_heads
        a = prefix + "self_attn."
        out.update({a + "q_proj.weight": (2 * nq * hd, h), a + "k_proj.weight": (nkv * hd, h),
                    a + "v_proj.weight": (nkv * hd, h), a + "o_proj.weight": (h, nq * hd),
                    a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
    out.update({prefix + "mlp.gate_proj.weight": (i, h), prefix + "mlp.up_proj.weight": (i, h),
                prefix + "mlp.down_proj.weight": (h, i), prefix + "input_layernorm.weight": (h,),
                prefix + "post_attention_layernorm.weight": (h,)})
    return out


def qwen35_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of a Qwen3.5 checkpoint for ``config``, in state-dict order, then ``mtp.*``.

    Closed-form from the config (no model is built); ``tests/test_synthetic.py`` checks it against
    the state dict of a ``torch.device("meta")`` ``Qwen3_5ForConditionalGeneration``.
    """
    t, v = config.text_config, config.vision_config
    vh, merged = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    shapes: dict[str, tuple[int, ...]] = {
        "model.visual.patch_embed.proj.weight": (vh, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "model.visual.patch_embed.proj.bias": (vh,),
        "model.visual.pos_embed.weight": (v.num_position_embeddings, vh),
    }
    for b in range(v.depth):
        p = f"model.visual.blocks.{b}."
        shapes.update({p + "norm1.weight": (vh,), p + "norm1.bias": (vh,), p + "norm2.weight": (vh,),
                       p + "norm2.bias": (vh,), p + "attn.qkv.weight": (3 * vh, vh), p + "attn.qkv.bias": (3 * vh,),
                       p + "attn.proj.weight": (vh, vh), p + "attn.proj.bias": (vh,),
                       p + "mlp.linear_fc1.weight": (v.intermediate_size, vh),
                       p + "mlp.linear_fc1.bias": (v.intermediate_size,),
                       p + "mlp.linear_fc2.weight": (vh, v.intermediate_size), p + "mlp.linear_fc2.bias": (vh,)})
    shapes.update({"model.visual.merger.norm.weight": (vh,), "model.visual.merger.norm.bias": (vh,),
                   "model.visual.merger.linear_fc1.weight": (merged, merged),
                   "model.visual.merger.linear_fc1.bias": (merged,),
                   "model.visual.merger.linear_fc2.weight": (v.out_hidden_size, merged),
                   "model.visual.merger.linear_fc2.bias": (v.out_hidden_size,),
                   "model.language_model.embed_tokens.weight": (t.vocab_size, t.hidden_size)})
    for n, kind in enumerate(t.layer_types):
        shapes.update(_decoder_layer(f"model.language_model.layers.{n}.", t, kind))
    shapes["model.language_model.norm.weight"] = (t.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, t.hidden_size)
    h = t.hidden_size
    shapes.update({"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
                   "mtp.pre_fc_norm_hidden.weight": (h,)})
    for n in range(getattr(t, "mtp_num_hidden_layers", 1)):
        shapes.update(_decoder_layer(f"mtp.layers.{n}.", t, "full_attention"))
    shapes["mtp.norm.weight"] = (h,)
    return shapes


def plan_shards(shapes: dict[str, tuple[int, ...]], element_size: int,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[str]]:
    """Split the names, in order, into shards of at most ``max_shard_bytes`` (one bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * element_size
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from (seed, name): values do not depend on the order or the sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little") >> 1


def random_tensor(name: str, shape: tuple[int, ...], *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                  scale: float = DEFAULT_SCALE, decay: float = 0.0) -> torch.Tensor:
    """One synthetic tensor, filled ``_FILL_ELEMENTS`` at a time (extra memory: one float32 block).

    Entries are ``scale * N(0, 1)``. With ``decay > 0`` column j of the 2-D view ``(d0, d1*...)``
    is scaled by ``(j + 1) ** -decay`` (renormalised to keep the RMS ``scale``): a spectrum that
    decays like a power law instead of the flat Marchenko–Pastur bulk. 1-D tensors are always iid.
    """
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    out = torch.empty(shape, dtype=dtype)
    rows = shape[0] if shape else 1
    flat = out.view(rows, -1)  # (d0, d1*...); a 1-D tensor is (d0, 1)
    cols = flat.shape[1]
    col_scale = torch.full((cols,), float(scale))
    if decay > 0 and len(shape) >= 2:
        w = torch.arange(1, cols + 1, dtype=torch.float64) ** -float(decay)
        col_scale = (w * (scale / w.square().mean().sqrt())).to(torch.float32)
    step = max(1, _FILL_ELEMENTS // max(cols, 1))
    for a in range(0, rows, step):
        block = torch.randn(min(step, rows - a), cols, generator=gen)  # (r, cols) float32
        flat[a:a + block.shape[0]] = block * col_scale
    return out


def write_qwen35_like(out_dir: str | Path, *, n_layers: int = 4, full_size: bool = True,
                      dtype: torch.dtype = torch.bfloat16, seed: int = 0, scale: float = DEFAULT_SCALE,
                      decay: float = 0.0, tie_word_embeddings: bool = False,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a random Qwen3.5-9B-shaped checkpoint (real tensor names) to ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Model directory (created; existing shard files of the same names are overwritten).
    n_layers : int
        Text decoder layers (pattern of :func:`qwen35_layer_types`); vision (27 blocks at full size)
        and the MTP head are always written whole.
    full_size : bool
        Real 9B dimensions (4 layers: ~7.1 GB bf16 untied, ~5.1 GB tied) or tiny ones (~0.2 MB).
    dtype : torch.dtype
        Stored dtype of every tensor (the real checkpoint is bf16 throughout).
    seed, scale, decay : int, float, float
        Values, see :func:`random_tensor`.
    tie_word_embeddings : bool
        ``False`` as in Qwen3.5-9B (``lm_head.weight`` stored); ``True``: the embedding stored once.
    max_shard_bytes : int
        Largest shard; bounds the generator's memory (about one shard plus 64 MiB).

    Returns
    -------
    Path
        The directory, with ``config.json``, the shards, the index and ``sahc_synthetic.json`` (the
        parameters, written last: it marks a complete checkpoint).
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}.")
    if not (math.isfinite(decay) and decay >= 0):
        raise ValueError(f"decay must be a finite number >= 0, got {decay!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_NAME).unlink(missing_ok=True)
    config = qwen35_config(n_layers, full_size=full_size, tie_word_embeddings=tie_word_embeddings)
    config.to_json_file(str(out / "config.json"), use_diff=True)
    shapes = qwen35_tensor_shapes(config)
    element_size = torch.empty(0, dtype=dtype).element_size()
    shards = plan_shards(shapes, element_size, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: random_tensor(n, shapes[n], dtype=dtype, seed=seed, scale=scale, decay=decay) for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    n_params = sum(math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_parameters": n_params, "total_size": n_params * element_size},
             "weight_map": weight_map}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    params = dict(n_layers=n_layers, full_size=full_size, dtype=str(dtype).removeprefix("torch."), seed=seed,
                  scale=scale, decay=decay, tie_word_embeddings=tie_word_embeddings, n_params=n_params)
    (out / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True))
    return out


def synthetic_params(model_dir: str | Path) -> dict | None:
    """The parameters a complete synthetic checkpoint was written with, or ``None`` (absent or partial)."""
    marker = Path(model_dir) / MARKER_NAME
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())
