"""compressed-tensors writer of :mod:`sahc_core.plans.export`: pack-quantized, symmetric int-k.

Each int-k ``nn.Linear`` weight becomes ``weight_packed`` (int32, ``(rows, ceil(cols*k/32))``: 32
codes fill k words), ``weight_scale`` (the run's fp16 scales, ``(rows, groups)``) and ``weight_shape``
(int64), produced by the package's ``PackedQuantizationCompressor`` from ``ŵ = (q - Q)·s`` and the
run's scales, and checked to unpack to the run's codes exactly (``ŵ / s`` is exact in float32: a
k ≤ 8-bit integer times an 11-bit fp16 mantissa fits float32's 24 bits, so nothing is re-quantized).
Strategy ``channel`` for ``group_size=None`` (one scale per row), ``group`` with the group size
otherwise; one config group per (bits, group size), targets = exact module names. ``config.json``
gets the ``quantization_config`` from ``ModelCompressor.update_config``.

Decisions (compressed-tensors 0.20.1, transformers 5.24):

- **asym is refused** for every tensor that would be packed (an asym tensor written dense anyway,
  e.g. an embedding, is written dense). Our asym stores an fp16 *float* zero ``z`` (``ŵ = q·s + z``);
  compressed-tensors dequantizes ``(q - zp)·s`` with an *integer* zero point (``zp_dtype`` int8;
  pack-quantized packs it with ``pack_to_int32``, which raises for any non-int8 tensor). ``zp = -z/s`` is an integer in only
  0.3-0.5 % of the groups of SmolLM2's layer-0 ``down_proj``; even a float zero point (possible only
  unpacked, ``naive-quantized``) gives ``fl(fl(q + z/s)·s) != fl(q·s + z)`` for 60-75 % of the
  weights (float32 ``zp``; 20-23 % with float64). The refusal names ``"scheme": "sym"``.
- **Embeddings and other non-Linear int tensors are stored dense** in the export dtype: the package
  can compress an ``nn.Embedding``, but transformers' ``_init_weights`` reads ``module.weight`` of
  every ``nn.Embedding`` and fails (``AttributeError``) on a compressed one, and a tied LM head then
  has nothing to tie to. Only 2-D weights of ``nn.Linear`` modules (found on a meta-device model built
  from the config) are packed; the result lists every other int tensor with its reason.
- **SVD/TT tensors are stored dense** in the export dtype (compressed-tensors has no low-rank or
  tensor-train format); the result says how many bytes that adds over the run's checkpoint.
- **Exact load**: ``AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)`` (or float16)
  gives the packed weights bit for bit as ``load_assembled(run, dtype=that dtype)``: the scale
  parameter takes the model dtype (the fp16 scale is cast exactly) and the dequantization multiplies
  in it. In bfloat16 the scales are rounded to bfloat16 first, so the weights differ in the last bits.
  ``CompressedTensorsConfig(dequantize=True)`` dequantizes in the stored scales' fp16: exact only when
  loading in float16.

References
----------
.. [1] vLLM project, compressed-tensors (``compressors/pack_quantized``, ``quantization/quant_args.py``).
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import Tensor

from sahc_core.methods import registry as methods
from sahc_core.plans.export import ExportJob, ExportRefused, ShardWriter, config_with_dtype, copy_model_files
from sahc_core.methods.quant import QuantConfig, QuantizedTensor, unpack_codes
from sahc_core.plans.plan import TIED

FORMAT = "pack-quantized"


def quant_args(cfg: QuantConfig):
    """The compressed-tensors ``QuantizationArgs`` of a symmetric :class:`QuantConfig`."""
    from compressed_tensors.quantization import QuantizationArgs

    assert cfg.scheme == "sym", "compressed-tensors export is symmetric only"
    strategy = "channel" if cfg.group_size is None else "group"
    return QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=True, strategy=strategy, group_size=cfg.group_size)


def signed_codes(q: QuantizedTensor) -> Tensor:
    """The run's codes minus ``Q = 2^(k-1) - 1`` as int8, shape ``q.shape`` (sym: in ``[-Q, Q]``)."""
    u = unpack_codes(q.codes, q.config.bits, math.prod(q.shape)).to(torch.int16)
    return (u - (2 ** (q.config.bits - 1) - 1)).to(torch.int8).reshape(q.shape)


def pack_tensor(q: QuantizedTensor) -> dict[str, Tensor]:
    """The pack-quantized state of one symmetric 2-D :class:`QuantizedTensor`, carrying its own codes.

    Returns ``{"weight_packed": int32 (rows, ceil(cols*k/32)), "weight_scale": float16 (rows, groups),
    "weight_shape": int64 (2,)}``.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme

    assert len(q.shape) == 2 and q.config.scheme == "sym"
    scheme = QuantizationScheme(targets=["Linear"], weights=quant_args(q.config), format=FORMAT)
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    s = q.scales.float()
    # a zero-range group stores s = 0 (its weights are all 0): any scale maps them to code 0
    safe = torch.where(s > 0, s, torch.ones_like(s))
    state = compressor.compress({"weight": q.reconstruct(torch.float32), "weight_scale": safe}, scheme)
    codes = signed_codes(q)
    assert torch.equal(unpack_from_int32(state["weight_packed"], q.config.bits, torch.Size(q.shape)), codes), \
        "compressed-tensors packed other codes than the run's"
    return {"weight_packed": state["weight_packed"], "weight_scale": q.scales, "weight_shape": state["weight_shape"]}


def _module_kinds(job: ExportJob) -> tuple[str, dict[str, str]]:
    """``(model class, {"<module>.weight": module class})`` of the model transformers builds from the
    config, instantiated on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(job.model_dir, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ExportRefused(f"transformers cannot build a causal LM from {job.model_dir} ({reason}); a "
                            "compressed-tensors export needs one, export as 'dense' instead.") from exc
    return type(model).__name__, {f"{n}.weight": type(m).__name__ for n, m in model.named_modules() if n}


def _packable(name: str, entry: dict, kinds: dict[str, str]) -> bool:
    """Only the 2-D weight of an ``nn.Linear`` is packed (see the module docstring)."""
    return _storage(entry) == "int-k" and kinds.get(name) == "Linear" and len(entry["shape"]) == 2


def _storage(entry: dict) -> str:
    """How the entry's method stores a tensor (``MethodSpec.storage``): only int-k codes can be packed."""
    return "tied" if entry["method"] == TIED else methods.get(entry["method"]).storage


def _int_k(c):
    """The :class:`QuantizedTensor` of an int-k method's loaded tensor (GPTQ / HQQ wrap theirs in a Tagged)."""
    return getattr(c, "inner", c)


def check(job: ExportJob) -> None:
    """Refuse a plan with no int-k ``nn.Linear`` weight to pack, and asym int tensors that would be packed."""
    _, kinds = _module_kinds(job)
    packable = sorted(n for n, e in job.tensors.items() if _packable(n, e, kinds))
    if not packable:
        raise ExportRefused("the plan quantizes no nn.Linear weight, so a compressed-tensors export would hold "
                            "no packed tensor; export it as 'dense' instead.")
    cfgs = {n: methods.quant_config_of(methods.config_from_dict(job.tensors[n]["config"])) for n in packable}
    asym = [n for n in packable if cfgs[n].scheme == "asym"]
    if asym:
        c = cfgs[asym[0]]
        more = f" (and {len(asym) - 1} more asym tensors)" if len(asym) > 1 else ""
        raise ExportRefused(
            f"compressed-tensors cannot store {asym[0]} exactly{more}: the plan quantizes it int{c.bits} asym with "
            "an fp16 float zero point (w = q*s + z) while compressed-tensors stores integer zero points "
            "(w = (q - zp)*s); re-run the plan with \"scheme\": \"sym\" for an exact compressed-tensors export, "
            "or export it as 'dense'.")


def _fallback_reason(name: str, entry: dict, kinds: dict[str, str], cls: str) -> str:
    if _storage(entry) == "other":
        return "compressed-tensors has no low-rank or tensor-train format"
    kind = kinds.get(name)
    if kind == "Embedding":
        return "transformers cannot load a compressed-tensors nn.Embedding (its _init_weights reads module.weight)"
    return f"it is not the 2-D weight of an nn.Linear module of {cls}"


def write(job: ExportJob, tmp) -> dict:
    """Write the shards, config (with ``quantization_config``) and tokenizer files into ``tmp``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    cls, kinds = _module_kinds(job)
    aliases = job.aliases()
    shards = ShardWriter(tmp, job.shard_bytes)
    groups: dict[tuple[int, int], list[str]] = {}
    packed: list[str] = []
    fallback: dict[str, str] = {}
    extra = Counter()  # bytes beyond the run's checkpoint, by cause
    for name, e, c in job.items():
        target = aliases.get(name, name)
        if _packable(name, e, kinds) and (target == name or target in packed):
            c = _int_k(c)
            state = pack_tensor(c)
            module = name.removesuffix(".weight")
            for key, t in state.items():
                shards.add(f"{module}.{key}", t)
            groups.setdefault((c.config.bits, c.config.group_size or 0), []).append(module)
            packed.append(name)
            extra["packing_padding_bytes"] += state["weight_packed"].nbytes - c.codes.nbytes
            extra["weight_shape_bytes"] += state["weight_shape"].nbytes
            continue
        t = c.weight if _storage(e) == "16-bit" else c.reconstruct(job.torch_dtype)
        shards.add(name, t)
        if _storage(e) != "16-bit" and target == name:
            fallback[name] = _fallback_reason(name, e, kinds, cls)
            extra["dense_fallback_bytes"] += t.nbytes - e["bytes"]
    n = shards.finish()
    qconfig = QuantizationConfig(
        config_groups={f"group_{i}": QuantizationScheme(
            targets=mods, weights=quant_args(QuantConfig(bits, g or None, "sym")), format=FORMAT)
            for i, ((bits, g), mods) in enumerate(sorted(groups.items()))},
        format=FORMAT, quantization_status=QuantizationStatus.COMPRESSED)
    copy_model_files(job, tmp, config_with_dtype(job.config, job.dtype))
    ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
    weights = sum(p.stat().st_size for p in tmp.glob("model*.safetensors"))
    overhead = {k: int(extra[k]) for k in ("packing_padding_bytes", "weight_shape_bytes", "dense_fallback_bytes")}
    overhead.update(zero_point_bytes=0, header_bytes=weights - shards.total)
    return {"tensors": n, "packed": packed, "dense_fallback": fallback, "overhead": overhead,
            "notes": _notes(job, groups, fallback, overhead)}


def _notes(job: ExportJob, groups: dict, fallback: dict[str, str], overhead: dict) -> list[str]:
    kinds = ", ".join(f"int{b} {'per-row' if not g else f'g{g}'} ({len(m)})" for (b, g), m in sorted(groups.items()))
    notes = [f"{sum(len(m) for m in groups.values())} int tensors are stored {FORMAT} with the run's codes and fp16 "
             f"scales: {kinds}; each packed row is padded to whole int32 words "
             f"({overhead['packing_padding_bytes']} bytes in all) and each packed tensor carries an int64 "
             f"weight_shape ({overhead['weight_shape_bytes']} bytes in all)."]
    by_reason: dict[str, list[str]] = {}
    for name, reason in fallback.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        notes.append(f"{len(names)} compressed tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) "
                     f"are stored dense in {job.dtype} because {reason}.")
    if fallback:
        notes.append(f"storing them dense adds {overhead['dense_fallback_bytes']} bytes over the run's checkpoint.")
    notes.append("loading with AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32) (or float16) gives the "
                 "packed weights bit for bit as the run's; bfloat16 rounds the scales first.")
    return notes
