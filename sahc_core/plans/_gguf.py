"""GGUF writer of :mod:`sahc_core.plans.export`: llama architecture, exact GGML block types only.

A GGML block holds 32 consecutive weights of a row with an fp16 scale ``d`` (and an fp16 minimum
``m``); the run's int-k tensors map onto one exactly when their groups are 32 wide:

============  ========  ==============================================  =======================
plan          GGML      stored                                          ŵ
============  ========  ==============================================  =======================
int8 sym      Q8_0      ``d``, ``c = q - 127`` (int8)                   ``d * c``
int4 sym      Q4_0      ``d``, nibble ``n = q + 1`` (``c = n - 8``)     ``d * (n - 8)``
int4 asym     Q4_1      ``d``, ``m = z``, nibble ``n = q``              ``d * n + m``
int5 sym      Q5_0      ``d``, 5-bit ``n = q + 1`` (4 low bits + qh)    ``d * (n - 16)``
int5 asym     Q5_1      ``d``, ``m = z``, 5-bit ``n = q``               ``d * n + m``
============  ========  ==============================================  =======================

Block bytes are laid out as ``gguf.quants`` writes them (low nibbles of weights 0-15, high nibbles of
16-31; Q5 high bits little-endian in ``qh``) from the run's codes, not re-quantized. ggml and
``gguf.quants.dequantize`` (what transformers loads GGUF with) compute ``d * n (+ m)`` in float32,
the product exactly, as :func:`sahc_core.methods.quant.dequantize` does, so the weights match bit for bit.
Refused (naming the tensor and the setting): other bit widths (2, 3, 6, 7 have no GGML type with a
plain fp16 scale), other group sizes (K-quants use 256-weight super-blocks with quantized sub-scales),
int-k 1-D tensors, architectures other than llama, rope scaling. Kept 2-D tensors are written as
stored (BF16/F16), 1-D tensors as F32 (llama.cpp keeps norms in F32; the upcast is exact), SVD/TT
reconstructions dense in the export dtype. Names come from ``gguf.get_tensor_name_map``; the rows of
``q_proj``/``k_proj`` are permuted as llama.cpp's ``convert_hf_to_gguf.py`` does (transformers undoes
it on load), which moves whole blocks. A tied LM head is not written (``output.weight`` absent is
what llama.cpp and transformers read as tied). The tokenizer is written for byte-level BPE
``tokenizer.json`` files (``gguf.vocab.BpeVocab`` + ``SpecialVocab``; pre-tokenizer ``"default"``),
otherwise left out with a note.

References
----------
.. [1] ggml ``ggml-common.h`` block_q4_0/q4_1/q5_0/q5_1/q8_0; gguf-py ``gguf/quants.py``.
.. [2] llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel.permute``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sahc_core.methods import registry as methods
from sahc_core.plans.export import ExportJob, ExportRefused
from sahc_core.plans.plan import TIED
from sahc_core.methods.quant import QuantizedTensor, unpack_codes

FILE = "model.gguf"
BLOCK = 32
#: (bits, scheme) -> GGML type name (``gguf.GGMLQuantizationType``)
EXACT = {(8, "sym"): "Q8_0", (4, "sym"): "Q4_0", (4, "asym"): "Q4_1", (5, "sym"): "Q5_0", (5, "asym"): "Q5_1"}
_DENSE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def ggml_type(name: str, entry: dict) -> str:
    """The GGML type a manifest entry is written as, or :class:`ExportRefused` naming why not."""
    shape = entry["shape"]
    storage = methods.get(entry["method"]).storage
    if storage == "16-bit":
        return "F32" if len(shape) == 1 else _DENSE[entry["config"].get("dtype", "bfloat16")]
    if storage != "int-k":
        return ""  # SVD/TT: dense in the export dtype
    cfg = methods.quant_config_of(methods.config_from_dict(entry["config"]))
    g = cfg.group_size or shape[-1]
    groups = f"one group per row of {g}" if cfg.group_size is None else f"groups of {g}"
    what = f"int{cfg.bits} {cfg.scheme} with {groups}"
    if len(shape) != 2:
        raise ExportRefused(f"GGUF cannot store {name} exactly: it is a {len(shape)}-D int-k tensor; keep it in "
                            "16-bit in the plan (llama.cpp keeps 1-D tensors in float) or export as 'dense'.")
    if g != BLOCK or (cfg.bits, cfg.scheme) not in EXACT:
        raise ExportRefused(f"GGUF cannot store {name} exactly: the plan quantizes it {what}, and the exact GGML "
                            "types are Q8_0 (int8 sym), Q4_0/Q4_1 (int4 sym/asym), Q5_0/Q5_1 (int5 sym/asym), all "
                            "in groups of 32; change the plan to one of them or export as 'dense'.")
    return EXACT[(cfg.bits, cfg.scheme)]


def _nibbles(n: np.ndarray) -> np.ndarray:
    """(blocks, 32) codes -> (blocks, 16) bytes: low nibble = weight j, high nibble = weight j + 16."""
    return (n[:, :16] & 0xF) | ((n[:, 16:] & 0xF) << 4)


def _high_bits(n: np.ndarray) -> np.ndarray:
    """(blocks, 32) 5-bit codes -> (blocks, 4) bytes: bit j = bit 4 of weight j (little-endian)."""
    return np.packbits((n >> 4).astype(np.uint8), axis=-1, bitorder="little")


#: GGML type -> block parts from (codes u (blocks, 32) uint8, scales d (blocks, 2), minima m (blocks, 2))
_LAYOUT = {
    "Q8_0": lambda u, d, m: [d, (u.astype(np.int16) - 127).astype(np.int8).view(np.uint8)],
    "Q4_0": lambda u, d, m: [d, _nibbles(u + 1)],
    "Q4_1": lambda u, d, m: [d, m, _nibbles(u)],
    "Q5_0": lambda u, d, m: [d, _high_bits(u + 1), _nibbles(u + 1)],
    "Q5_1": lambda u, d, m: [d, m, _high_bits(u), _nibbles(u)],
}


def blocks(q: QuantizedTensor, typ: str) -> np.ndarray:
    """GGML blocks of a 2-D :class:`QuantizedTensor` with 32-wide groups: uint8 ``(rows, row bytes)``."""
    rows, cols = q.shape
    u = unpack_codes(q.codes, q.config.bits, rows * cols).numpy().reshape(-1, BLOCK)  # (blocks, 32), row-major
    d = q.scales.reshape(-1, 1).numpy().view(np.uint8)  # (blocks, 2): fp16 bytes, same block order
    m = None if q.zeros is None else q.zeros.reshape(-1, 1).numpy().view(np.uint8)
    return np.concatenate(_LAYOUT[typ](u, d, m), axis=1).reshape(rows, -1)


def _hparams(job: ExportJob) -> dict:
    c = job.config
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling:
        raise ExportRefused(f"GGUF export writes no rope scaling, and {job.model_dir} uses {scaling}; export as 'dense'.")
    if c.get("hidden_act", "silu") != "silu":
        raise ExportRefused(f"GGUF llama expects the silu activation, {job.model_dir} uses {c['hidden_act']}; export "
                            "as 'dense'.")
    heads = int(c["num_attention_heads"])
    return {"layers": int(c["num_hidden_layers"]), "hidden": int(c["hidden_size"]), "ffn": int(c["intermediate_size"]),
            "heads": heads, "kv_heads": int(c.get("num_key_value_heads") or heads),
            "head_dim": int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            "ctx": int(c.get("max_position_embeddings", 2048)), "eps": float(c.get("rms_norm_eps", 1e-6)),
            "theta": float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), "vocab": int(c["vocab_size"])}


def _names(job: ExportJob) -> dict[str, str]:
    """``{checkpoint name: GGUF name}`` of every tensor to write (tied aliases left out)."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, _hparams(job)["layers"])
    out = {}
    for name, e in job.tensors.items():
        if e["method"] == TIED:
            continue
        g = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ExportRefused(f"GGUF has no llama tensor name for {name}; export as 'dense'.")
        out[name] = g
    return out


def check(job: ExportJob) -> None:
    """Refuse a non-llama model, unsupported hyper-parameters and any tensor without an exact GGML type."""
    if job.architecture != "llama":
        raise ExportRefused(f"GGUF export supports the llama architecture only (tensor names, q/k permutation, "
                            f"metadata), and {job.model_dir} is {job.architecture!r}; export as 'dense'.")
    _names(job)
    for name, e in job.tensors.items():
        if e["method"] != TIED:
            ggml_type(name, e)


def _rows_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's ``permute``: ``W.reshape(h, 2, rows/h/2, ...).swapaxes(1, 2)``."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _dense(t: torch.Tensor, typ: str) -> np.ndarray:
    if typ == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return t.to(torch.float32 if typ == "F32" else torch.float16).contiguous().numpy()


def write(job: ExportJob, tmp: Path) -> dict:
    """Write ``model.gguf`` (metadata, tokenizer, tensors) plus config and tokenizer files into ``tmp``."""
    import gguf

    from sahc_core.plans.export import config_with_dtype, copy_model_files

    hp = _hparams(job)
    names = _names(job)
    writer = gguf.GGUFWriter(tmp / FILE, "llama", use_temp_file=True)  # tensors spool to a temp file, not RAM
    writer.add_name(str(job.config.get("_name_or_path") or job.model_dir.name))
    writer.add_context_length(hp["ctx"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["theta"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_vocab_size(hp["vocab"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    notes = [_tokenizer(writer, job.model_dir, hp["vocab"])]
    types: dict[str, int] = {}
    for name, e, c in job.items():
        if name not in names:  # a tied alias: GGUF reads a missing output.weight as tied
            continue
        typ = ggml_type(name, e) or _DENSE[job.dtype]
        storage = methods.get(e["method"]).storage
        if storage == "int-k":
            arr = blocks(getattr(c, "inner", c), typ)  # GPTQ / HQQ wrap their QuantizedTensor in a Tagged
        else:
            t = c.weight if storage == "16-bit" else c.reconstruct(job.torch_dtype)
            arr = _dense(t, typ)
        heads = {"self_attn.q_proj.weight": hp["heads"], "self_attn.k_proj.weight": hp["kv_heads"]}
        h = next((v for k, v in heads.items() if name.endswith(k)), None)
        if h is not None:
            arr = arr[_rows_permutation(arr.shape[0], h)]
        raw = getattr(gguf.GGMLQuantizationType, typ)
        writer.add_tensor(names[name], np.ascontiguousarray(arr), raw_dtype=raw if arr.dtype == np.uint8 else None)
        types[typ] = types.get(typ, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    copy_model_files(job, tmp, config_with_dtype(job.config, job.dtype))
    notes.insert(0, "tensors by GGML type: " + ", ".join(f"{k} {v}" for k, v in sorted(types.items())) + "; the "
                 "int blocks carry the run's codes and fp16 scales (and minima).")
    if any(e["method"] != TIED and methods.get(e["method"]).storage == "other" for e in job.tensors.values()):
        notes.append(f"SVD/TT tensors are stored dense ({_DENSE[job.dtype]}): GGUF has no low-rank format.")
    return {"tensors": len(names), "ggml_types": types, "notes": notes}


def _tokenizer(writer, model_dir: Path, n_vocab: int) -> str:
    """Add a byte-level BPE tokenizer (padded to ``n_vocab`` tokens); returns the note to report."""
    from gguf import TokenType
    from gguf.vocab import BpeVocab, SpecialVocab

    try:
        vocab = BpeVocab(model_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return (f"no tokenizer was written into {FILE} ({exc}); llama.cpp needs one, transformers loads the "
                "model from it and the tokenizer from the copied tokenizer files.")
    tokens, types = [], []
    for text, _score, typ in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        types.append(typ)
    for i in range(len(tokens), n_vocab):  # embedding rows beyond the tokenizer, as convert_hf_to_gguf pads
        tokens.append(f"[PAD{i}]".encode())
        types.append(TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return (f"the byte-level BPE tokenizer ({len(tokens)} tokens) is in {FILE} with pre-tokenizer 'default' "
            "(llama.cpp may split text differently from the model's own pre-tokenizer).")
